"""Capture this node as a small sysroot that ``coherence env --sysroot`` can replay.

``capture(dest)`` runs the live fingerprint through a :class:`RecordingView` (a
:class:`harness.virtualization.HostView` that notes every path it reads, probes, lists or
preads) and then writes exactly those paths under ``dest``:

- files read whole are copied as read (the bytes the fingerprint saw, not a re-read);
- preads keep only the bytes read, at their offsets (ACPI headers, the SMBIOS type-0
  entry); the CPUID device ``/dev/cpu/N/cpuid`` becomes ``cpuid.leaves`` text, one line
  per leaf read (see :func:`harness.virtualization.read_leaves`), since a sparse file at
  offset 0x40000000 has a gigabyte's apparent size that git and tar expand;
- directories that were listed or tested keep their sub-directories (empty ones get a
  ``.keep`` file so git keeps them); files that were only tested for existence are copied;
- the CPU clock kept per boot (:data:`harness.cpuclock.CLOCK_CACHE`) and the boot id it is
  keyed on, so the replay derives the same CPU peak without measuring.

With ``anonymize`` host names, serials, UUIDs, machine id, MAC addresses and container ids
are replaced by stable salted pseudonyms (:func:`harness.environment.pseudonym`); the
boot id is pseudonymized consistently in the clock cache too.

The snapshot must stay under :data:`MAX_BYTES` (1 MiB of file content): a larger one is
refused before anything is written. Bad targets raise :class:`harness.errors.UserError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

from harness import atomic
from harness.errors import UserError
from harness.virtualization import CPUID_DEVICE, LEAVES_SUFFIX, HostView, write_leaves

MAX_BYTES = 1 << 20

# Files whose whole content is an identifier of this host (DMI: Linux ABI
# sysfs-class-dmi-id; hostname/machine-id: hostname(5), machine-id(5)).
_ID_FILES = {
    "/etc/hostname": "host", "/proc/sys/kernel/hostname": "host",
    "/sys/class/dmi/id/product_serial": "serial", "/sys/class/dmi/id/board_serial": "serial",
    "/sys/class/dmi/id/chassis_serial": "serial", "/sys/class/dmi/id/product_uuid": "uuid",
    "/sys/class/dmi/id/board_asset_tag": "serial", "/etc/machine-id": "machine-id",
    "/var/lib/dbus/machine-id": "machine-id", "/proc/sys/kernel/random/boot_id": "uuid",
}
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_MAC = re.compile(r"\b(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\b")
# Container ids and similar: long hex runs with at least one letter (not plain numbers).
_HEXID = re.compile(r"\b(?=[0-9]*[a-f])[0-9a-f]{16,}\b")
_SERIAL_LINE = re.compile(r"^(Serial\s*:\s*)(\S+)", re.MULTILINE)  # arm/ppc cpuinfo


@dataclass
class Recording:
    """What a RecordingView saw: whole-file reads, preads, directories, existing files."""

    files: dict = field(default_factory=dict)      # path -> bytes as read
    preads: dict = field(default_factory=dict)     # path -> {offset: bytes}
    dirs: set = field(default_factory=set)         # directories to recreate
    touched: set = field(default_factory=set)      # paths tested with exists()


class RecordingView(HostView):
    """A live HostView that records every path the fingerprint reads (for capture)."""

    def __init__(self, root: str = "/", env: dict | None = None, run=None):
        super().__init__(root, env, run)
        self.recording = Recording()

    def read_bytes(self, p: str, limit: int = 4 << 20) -> bytes:
        # The bytes the fingerprint parsed, before its (lossy) decode.
        data = super().read_bytes(p, limit)
        self.recording.files.setdefault(p, data)
        return data

    def pread(self, p: str, n: int, offset: int):
        data, why = super().pread(p, n, offset)
        if data is not None:
            self.recording.preads.setdefault(p, {})[offset] = data
        return data, why

    def exists(self, p: str) -> bool:
        ok = super().exists(p)
        if ok:
            self.recording.touched.add(p)
        return ok

    def isdir(self, p: str) -> bool:
        ok = super().isdir(p)
        if ok:
            self.recording.dirs.add(p)
        return ok

    def listdir(self, p: str):
        names = super().listdir(p)
        if names is not None:
            self.recording.dirs.add(p)
            for n in names:
                child = os.path.join(p, n)
                if os.path.isdir(self.path(child)):
                    self.recording.dirs.add(child)
        return names


class _Anonymizer:
    """Stable pseudonyms for identifiers, applied to every captured text file."""

    def __init__(self, salt: str | None):
        from harness.environment import pseudonym

        self._pseudonym = lambda v, prefix: pseudonym(v, prefix, salt)
        self.literals: dict[str, str] = {}

    def _hex(self, value: str, length: int) -> str:
        digest = self._pseudonym(value, "hex").split("-", 1)[1]
        return (hashlib.sha256(digest.encode()).hexdigest() * 4)[:length]

    def uuid(self, value: str) -> str:
        h = self._hex(value.lower(), 32)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def identifier(self, path: str, value: str) -> str:
        kind = _ID_FILES[path]
        if kind == "uuid":
            return self.uuid(value)
        if kind == "machine-id":
            return self._hex(value, 32)
        return self._pseudonym(value, kind)

    def path(self, p: str) -> str:
        """A path with identifiers in its components swapped the same way as in file text
        (a container id names both a line of /proc/self/cgroup and a cgroup directory)."""
        made = set(self.literals.values())
        parts = []
        for part in p.split("/"):
            part = _UUID.sub(lambda m: m.group(0) if m.group(0) in made else self.uuid(m.group(0)), part)
            part = _HEXID.sub(lambda m: m.group(0) if m.group(0) in made else self._hex(m.group(0), len(m.group(0))), part)
            parts.append(part)
        return "/".join(parts)

    def learn(self, rec: Recording) -> None:
        for path in _ID_FILES:
            raw = rec.files.get(path)
            value = raw.decode("utf-8", "replace").strip() if raw else ""
            if value and value.lower() not in ("none", "not specified", "default string", "to be filled by o.e.m."):
                self.literals[value] = self.identifier(path, value)

    def text(self, path: str, data: bytes) -> bytes:
        s = data.decode("utf-8", "surrogateescape")
        if path in _ID_FILES:
            value = s.strip()
            if value in self.literals:
                return (self.literals[value] + ("\n" if s.endswith("\n") else "")).encode()
        # Elsewhere only identifiers long enough not to hit ordinary words ("vm", "node").
        for old, new in sorted(self.literals.items(), key=lambda kv: -len(kv[0])):
            if len(old) < 6:
                continue
            s = re.sub(r"(?<![A-Za-z0-9])" + re.escape(old) + r"(?![A-Za-z0-9])", new, s)
        made = set(self.literals.values())  # never pseudonymize a pseudonym again
        s = _UUID.sub(lambda m: m.group(0) if m.group(0) in made else self.uuid(m.group(0)), s)
        s = _MAC.sub(lambda m: "02:" + ":".join(self._hex(m.group(0), 10)[i:i + 2] for i in range(0, 10, 2)), s)
        s = _HEXID.sub(lambda m: m.group(0) if m.group(0) in made else self._hex(m.group(0), len(m.group(0))), s)
        s = _SERIAL_LINE.sub(lambda m: m.group(1) + self._hex(m.group(2), 16), s)
        return s.encode("utf-8", "surrogateescape")


def _plan(rec: Recording, view: HostView, anonymize: bool, salt: str | None) -> tuple[dict, set]:
    """{relative path: bytes} and {relative dirs} of the snapshot."""
    from harness import cpuclock

    files: dict[str, bytes] = {}
    for p, data in rec.files.items():
        files[p] = data
    for p, chunks in rec.preads.items():
        if CPUID_DEVICE.fullmatch(p):
            files[p + LEAVES_SUFFIX] = write_leaves(chunks).encode()
            continue
        end = max(off + len(d) for off, d in chunks.items())
        if end > MAX_BYTES:
            raise UserError(f"capture: {p} was read at offset {end:#x}, too far to keep in a snapshot")
        buf = bytearray(end)  # bytes not read stay zero (the reader never looks at them)
        for off, d in chunks.items():
            buf[off:off + len(d)] = d
        files[p] = bytes(buf)
    for p in rec.touched:
        if p in files or p in rec.dirs:
            continue
        live = view.path(p)
        if os.path.isfile(live):
            try:
                with open(live, "rb") as f:
                    files[p] = f.read(65536)
            except OSError:
                files[p] = b""
        elif os.path.isdir(live):
            rec.dirs.add(p)

    # The affinity set: read live through sched_getaffinity, from a snapshot through
    # /proc/self/status; keep only its Cpus_allowed/Mems_allowed lines (proc(5)).
    if "/proc/self/status" not in files:
        try:
            with open(view.path("/proc/self/status"), "rb") as f:
                lines = [ln for ln in f.read(65536).splitlines(True)
                         if ln.startswith((b"Cpus_allowed", b"Mems_allowed"))]
            if lines:
                files["/proc/self/status"] = b"".join(lines)
        except OSError:
            pass

    # The CPU clock kept per boot (harness.cpuclock), and the boot id it is keyed on.
    cache = cpuclock.cache_path("/", view.env)
    try:
        with open(cache, "rb") as f:
            files["/" + cpuclock.CLOCK_CACHE] = f.read(65536)
    except OSError:
        pass  # _keep_clock may have recorded the figure instead
    bid = "/" + cpuclock.BOOT_ID_PATH
    if bid not in files:
        try:
            with open(view.path(bid), "rb") as f:
                files[bid] = f.read(256)
        except OSError:
            pass

    if anonymize:
        anon = _Anonymizer(salt)
        anon.learn(Recording(files=files))
        for p in list(files):
            if p.endswith(LEAVES_SUFFIX) or p in rec.preads:
                continue  # binary: CPUID registers, firmware tables
            files[p] = anon.text(p, files[p])
        # The clock cache's boot id went through the same literal swap as boot_id itself,
        # so the replay still finds the cache to be of this boot.
        files = {anon.path(p): data for p, data in files.items()}
        dirs = {anon.path(d) for d in rec.dirs}
        return files, dirs
    return files, set(rec.dirs)


def _keep_clock(view: RecordingView, doc: dict) -> None:
    """Where the live clock could not be kept in the per-boot cache (read-only /var), record
    the figure the fingerprint used in the snapshot's cache, so the replay derives the same
    peak; the cache format is harness.cpuclock's (version, clock_hz, how, boot_id)."""
    import json

    from harness import cpuclock

    if os.path.exists(cpuclock.cache_path("/", view.env)):
        return
    measured = ((doc.get("cpu") or {}).get("frequency") or {}).get("measured_mhz") or {}
    if not measured.get("value"):
        return
    record = {"version": 1, "clock_hz": float(measured["value"]) * 1e6,
              "how": f"{measured.get('source')} (recorded by coherence env --capture)",
              "boot_id": cpuclock.boot_id("/")}
    view.recording.files["/" + cpuclock.CLOCK_CACHE] = json.dumps(record).encode()


def _nvml_record_path() -> str:
    from harness import nvml_record

    return nvml_record.RECORD_PATH


def _nvml_recording(anonymize: bool, salt: str | None) -> bytes | None:
    """NVML cannot answer from a sysroot, so a GPU node's capture carries a recording of
    what NVML says here (harness.nvml_record), replayed by ``env --sysroot``. None where
    NVML does not start (no driver, no GPU) or pynvml is missing."""
    import json

    from harness import environment, nvml_record

    pseudo = (lambda v: environment.pseudonym(v, "uuid", salt)) if anonymize else None
    try:
        rec = nvml_record.record(pseudonym=pseudo)
    except Exception:  # noqa: BLE001 - a broken driver must not lose the rest of the capture
        return None
    return None if rec is None else json.dumps(rec, indent=1, sort_keys=True).encode()


def _check_target(dest: str) -> None:
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UserError(f"capture target {dest} exists and is not a directory")
    if os.path.isdir(dest):
        try:
            entries = os.listdir(dest)
        except OSError as e:
            raise UserError(f"capture target {dest} is unreadable: {e.strerror or e}") from None
        if entries:
            raise UserError(f"capture target {dest} is not empty ({len(entries)} entries); give a new or empty directory")
        if not os.access(dest, os.W_OK | os.X_OK):
            raise UserError(f"capture target {dest} is not writable")
    else:
        parent = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(parent):
            raise UserError(f"capture target {dest}: parent directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"capture target {dest}: parent directory {parent} is not writable")


def capture(dest: str, *, anonymize: bool = False, salt: str | None = None,
            max_bytes: int = MAX_BYTES) -> dict:
    """Write a snapshot of this node under ``dest`` (a new or empty directory).

    Returns ``{"dest", "files", "dirs", "bytes", "doc"}``: the counts, the total file
    content in bytes, and the live fingerprint the snapshot was recorded from (with
    ``doc["nominal"]``). Raises UserError for a bad target or a snapshot over ``max_bytes``.
    """
    from harness import environment

    _check_target(dest)
    view = RecordingView("/")
    doc = environment.collect(anonymize=anonymize, salt=salt, view=view, import_frameworks=False,
                              with_nominal=True)
    _keep_clock(view, doc)
    files, dirs = _plan(view.recording, view, anonymize, salt)
    nvml = _nvml_recording(anonymize, salt)
    if nvml is not None:
        files["/" + _nvml_record_path()] = nvml
    total = sum(len(b) for b in files.values())
    if total > max_bytes:
        big = sorted(files.items(), key=lambda kv: -len(kv[1]))[:3]
        raise UserError(f"capture would hold {total} bytes, over the {max_bytes}-byte limit "
                        f"(largest: {', '.join(f'{p} {len(b)} B' for p, b in big)}); nothing written")
    try:
        os.makedirs(dest, exist_ok=True)
        for d in sorted(dirs):
            os.makedirs(os.path.join(dest, d.lstrip("/")), exist_ok=True)
        for p, data in files.items():
            target = os.path.join(dest, p.lstrip("/"))
            if os.path.isdir(target):
                continue  # read as a file live but listed as a directory: keep the directory
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # The one writer (mode 0644, refuses a symlink or device already there); no
            # fsync per file: a snapshot of hundreds of small files is redone, not resumed.
            atomic.write_bytes(target, data, durable=False)
        for d in sorted(dirs):
            full = os.path.join(dest, d.lstrip("/"))
            if os.path.isdir(full) and not os.listdir(full):
                atomic.write_bytes(os.path.join(full, ".keep"), b"", durable=False)
    except OSError as e:
        raise UserError(f"capture target {dest}: cannot write ({e.strerror or e}: {e.filename or ''})") from None
    return {"dest": dest, "files": len(files), "dirs": len(dirs), "bytes": total, "doc": doc}


def check_sysroot(root: str) -> None:
    """Raise UserError unless ``root`` looks like a captured machine (a readable, non-empty
    directory with a parseable /proc/cpuinfo)."""
    if not root:
        raise UserError("--sysroot: empty path")
    if not os.path.exists(root):
        raise UserError(f"sysroot {root} does not exist")
    if not os.path.isdir(root):
        raise UserError(f"sysroot {root} is not a directory")
    try:
        entries = [e for e in os.listdir(root) if e not in ("expected.yaml", "README.md", ".keep")]
    except OSError as e:
        raise UserError(f"sysroot {root} is unreadable: {e.strerror or e}") from None
    if not entries:
        raise UserError(f"sysroot {root} is empty (capture one with coherence env --capture DIR)")
    if not any(os.path.isdir(os.path.join(root, d)) for d in ("proc", "sys")):
        raise UserError(f"sysroot {root} has neither proc/ nor sys/: not a captured machine")
    cpuinfo = os.path.join(root, "proc", "cpuinfo")
    # Every Linux machine has /proc/cpuinfo and every capture keeps it; without it the
    # folder is not a machine (e.g. a capture's own proc/ given as the root).
    if not os.path.isfile(cpuinfo):
        raise UserError(f"sysroot {root} has no proc/cpuinfo: not a captured machine "
                        "(give the folder that coherence env --capture wrote)")
    try:
        with open(cpuinfo, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise UserError(f"sysroot {root}: proc/cpuinfo unreadable ({e.strerror or e})") from None
    text = head.decode("utf-8", "replace")
    if b"\x00" in head or "\ufffd" in text or not re.search(r"^(processor|vendor_id|Features|cpu|CPU implementer)\s*:",
                                                              text, re.MULTILINE):
        raise UserError(f"sysroot {root}: proc/cpuinfo is not a cpuinfo file (binary or no processor entries)")
    from harness import nvml_record

    recording = os.path.join(root, nvml_record.RECORD_PATH)
    if os.path.exists(recording):
        nvml_record.load_record(recording)  # raises UserError naming the file
