"""The CPU core clock behind the derived CPU peak, measured once per boot and kept.

Why measure: in most VMs there is no cpufreq driver, and /proc/cpuinfo's "cpu MHz" is the
TSC rate (usually the base clock) while the cores boost above it; a peak derived from it
understates the nominal and puts GEMMs above 100 % of "peak". Where the OS publishes
``cpufreq/cpuinfo_max_freq`` that figure wins and nothing here runs.

How: a chain of dependent 64-bit integer adds runs as machine code on one core. An add
whose input is the previous add's result has a latency of one cycle on every x86-64 core
since the Pentium Pro (Intel 64 and IA-32 Optimization Reference Manual, appendix on
instruction latency; AMD Software Optimization Guides for families 17h/19h/1Ah) and on
Arm's Neoverse N1/V1/V2 cores (Arm Neoverse N1, V1 and V2 Software Optimization Guides,
"ADD, immediate": latency 1). So cycles = adds and clock = adds / time.

Why it is never lowered by load: a reading taken while another thread shares the core
(or the vCPU is descheduled) takes longer and gives a *lower* clock, never a higher
one, so the highest of many short readings is the clock the core reaches when it runs
alone. And the figure is kept per boot in a small JSON file (``CLOCK_CACHE`` under the
root; the boot id comes from /proc/sys/kernel/random/boot_id): every later run on the same
boot, loaded or not, uses the same figure instead of measuring again. The first writer of
a boot wins (hard link, which fails if the file exists), so two concurrent first runs
also agree.

Under a captured machine (``--sysroot``, ``live=False``) nothing is measured: the cached
clock is read from the snapshot (``coherence env --capture`` copies ``CLOCK_CACHE``), or
the clock is unknown with its reason.

Architectures: x86-64 and AArch64 Linux. Elsewhere, or where executable memory is refused
(W^X policies), the measurement returns None with the reason.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import platform
import struct
import time
from typing import Mapping

__all__ = [
    "CLOCK_CACHE", "STATE_DIR_ENV", "BOOT_ID_PATH", "ADDS_PER_ITERATION",
    "cache_path", "boot_id", "read_cached_clock", "clock_hz", "measure_clock_hz",
]

#: Where the per-boot clock is kept, relative to the machine's root.
CLOCK_CACHE = "var/tmp/coherence/cpu-clock.json"
#: Environment variable redirecting the live cache's directory (tests, read-only /var).
STATE_DIR_ENV = "COHERENCE_STATE_DIR"
#: Per-boot random id the cache is keyed on (Linux, proc(5)).
BOOT_ID_PATH = "proc/sys/kernel/random/boot_id"
_CACHE_VERSION = 1

ADDS_PER_ITERATION = 8

# x86-64 System V: mov rcx, rdi; xor eax, eax; loop: 8 x (add rax, 1); dec rcx; jnz loop; ret
_X86_64_CODE = (
    bytes.fromhex("4889f9" "31c0")
    + bytes.fromhex("4883c001") * ADDS_PER_ITERATION
    + bytes.fromhex("48ffc9")
    + bytes([0x75, (-(4 * ADDS_PER_ITERATION + 3 + 2)) & 0xFF])
    + bytes.fromhex("c3")
)
# AArch64 AAPCS64 (A64 encodings, Arm Architecture Reference Manual):
# mov x1, x0; mov x0, #0; loop: 8 x (add x0, x0, #1); subs x1, x1, #1; b.ne loop; ret
_A64_WORDS = (
    [0xAA0003E1, 0xD2800000]
    + [0x91000400] * ADDS_PER_ITERATION
    + [0xF1000421,
       # b.ne back over the adds and the subs: imm19 = -(ADDS + 1) instructions, cond NE = 1
       0x54000000 | (((-(ADDS_PER_ITERATION + 1)) & 0x7FFFF) << 5) | 0x1,
       0xD65F03C0]
)
_AARCH64_CODE = b"".join(struct.pack("<I", w) for w in _A64_WORDS)

_CODE = {"x86_64": _X86_64_CODE, "amd64": _X86_64_CODE, "aarch64": _AARCH64_CODE,
         "arm64": _AARCH64_CODE}


def cache_path(root: str = "/", environ: Mapping[str, str] | None = None) -> str:
    """Absolute path of the clock cache for the machine at ``root``.

    For the live machine (``root`` resolving to ``/``) ``$COHERENCE_STATE_DIR`` may redirect
    it to ``$COHERENCE_STATE_DIR/cpu-clock.json``; a captured machine keeps it at
    ``CLOCK_CACHE`` under its root, which is where ``env --capture`` puts it.
    """
    environ = os.environ if environ is None else environ
    root = root or "/"
    if os.path.realpath(root) == "/" and environ.get(STATE_DIR_ENV):
        return os.path.join(environ[STATE_DIR_ENV], os.path.basename(CLOCK_CACHE))
    return os.path.join(root, CLOCK_CACHE)


def boot_id(root: str = "/") -> str | None:
    """This boot's id (/proc/sys/kernel/random/boot_id under ``root``), or None if unreadable."""
    try:
        with open(os.path.join(root or "/", BOOT_ID_PATH), encoding="ascii", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def read_cached_clock(root: str = "/", environ: Mapping[str, str] | None = None) -> tuple[float | None, str]:
    """(clock in Hz, where it came from) from the per-boot cache, or (None, why not).

    Measures nothing. A cache written under another boot than the root's current boot id is
    stale (a different boot may be a different host or CPU setting) and is not used; a
    snapshot without a boot id keeps its cache (said in the source). Never raises.
    """
    path = cache_path(root, environ)
    shown = CLOCK_CACHE if path == os.path.join(root or "/", CLOCK_CACHE) else path
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, f"no clock cache ({shown})"
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return None, f"clock cache {shown} unreadable ({type(e).__name__})"
    if not isinstance(doc, dict):
        return None, f"clock cache {shown} is not a JSON object"
    hz = doc.get("clock_hz")
    if isinstance(hz, bool) or not isinstance(hz, (int, float)) or not (1e8 <= hz <= 1e10):
        return None, f"clock cache {shown}: clock_hz {hz!r} is not a plausible clock (0.1-10 GHz)"
    now = boot_id(root)
    then = doc.get("boot_id")
    if now and then and now != then:
        return None, f"clock cache {shown} is from another boot ({then}), not used"
    how = str(doc.get("how") or "measured")
    boot_note = f"boot {then}" if then else "boot id not recorded"
    if not now:
        boot_note += "; this root has no boot id to check it against"
    return float(hz), f"{how}; kept per boot in {shown} ({boot_note})"


def _write_cache(path: str, hz: float, how: str, bid: str | None) -> None:
    """Publish the clock unless another process already did (first writer of a boot wins)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": _CACHE_VERSION, "clock_hz": hz, "how": how, "boot_id": bid,
                   "arch": platform.machine(), "written_unix": time.time()}, f)
    try:
        try:
            os.link(tmp, path)  # fails if present: never overwrite another run's figure
        except FileExistsError:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if isinstance(old, dict) and bid and old.get("boot_id") not in (None, bid):
                os.replace(tmp, path)  # a previous boot's figure: replace it
                return
            if not isinstance(old, dict) or not isinstance(old.get("clock_hz"), (int, float)):
                os.replace(tmp, path)  # a damaged file: replace it
                return
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def clock_hz(root: str = "/", *, live: bool, environ: Mapping[str, str] | None = None) -> tuple[float | None, str]:
    """(core clock in Hz, how it was obtained) or (None, why it is unknown).

    The per-boot cache first; if there is none and ``live`` is true, measure
    (:func:`measure_clock_hz`) and keep the figure in the cache (a cache that cannot be
    written is said in the source, the figure is still returned). With ``live=False``
    nothing is measured. Never raises.
    """
    hz, why = read_cached_clock(root, environ)
    if hz is not None:
        return hz, why
    if not live:
        return None, f"{why}; not measured (captured machine, not live)"
    hz, how = measure_clock_hz()
    if hz is None:
        return None, how
    path = cache_path(root, environ)
    try:
        _write_cache(path, hz, how, boot_id(root))
    except (OSError, ValueError) as e:
        return hz, f"{how}; not kept (cache {path}: {type(e).__name__}: {e})"
    cached, src = read_cached_clock(root, environ)
    return (cached, src) if cached is not None else (hz, how)


def _mprotect_exec(address: int, length: int) -> bool:
    """Make a written page read+execute. On AArch64 the kernel cleans the data cache and
    invalidates the instruction cache for the page when it becomes executable, so the
    new code is what runs (Linux arm64 __sync_icache_dcache)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(length),
                             mmap.PROT_READ | mmap.PROT_EXEC) == 0
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def measure_clock_hz(iterations: int = 400_000, tries: int = 40) -> tuple[float | None, str]:
    """(clock in Hz, how it was measured) or (None, why not). Takes about 0.1-0.3 s.

    ``tries`` readings of ``iterations`` x 8 dependent adds each (about 1 ms at 3 GHz, below
    a scheduler time slice, so most readings run uninterrupted even next to busy threads);
    the highest clock wins. x86-64 and AArch64 Linux only.
    """
    machine = platform.machine().lower()
    code = _CODE.get(machine)
    if code is None or platform.system() != "Linux":
        return None, f"no clock measurement on {platform.system()}/{platform.machine()}"
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:
        return None, f"anonymous mapping refused ({exc})"
    chain = None
    try:
        buf.write(code)
        anchor = ctypes.c_char.from_buffer(buf)
        address = ctypes.addressof(anchor)
        del anchor  # the buffer must not stay exported, or close() fails
        if not _mprotect_exec(address, mmap.PAGESIZE):
            return None, "executable memory refused (mprotect PROT_EXEC failed)"
        chain = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)
        if chain(10) != 10 * ADDS_PER_ITERATION:  # the code did what it should
            return None, "add-chain self-test failed"
        chain(iterations)  # warm up: page the code in, let the core leave idle states
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter_ns()
            chain(iterations)
            best = min(best, (time.perf_counter_ns() - t0) * 1e-9)
        if not best > 0:
            return None, "timer too coarse for the add chain"
        hz = iterations * ADDS_PER_ITERATION / best
        return hz, (f"measured ({machine}): chain of {iterations * ADDS_PER_ITERATION:.3g} dependent "
                    f"64-bit adds (1 cycle each), highest of {tries} readings on one core")
    finally:
        chain = None
        try:
            buf.close()
        except (BufferError, ValueError):
            pass
