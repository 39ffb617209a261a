"""The one writer of files that coherence produces (run files, reports, exports, captures).

Every file is written the same way: a temporary file in the target's own folder
(``.<name>.<random>.tmp``, so node_exporter's textfile collector and globs for
``*.parquet`` ignore it), written, flushed and ``fsync``-ed, given mode 0644, then
renamed over the target with ``os.replace`` (atomic within one file system, POSIX
rename(2)). A reader therefore sees the old file or the new one, never half of one.

Why 0644 and not the 0600 that :func:`tempfile.mkstemp` creates: a run folder is shared
through web servers, NFS and CI artifacts, and every run file must be readable there
(issue 14 item 7). The mode is set explicitly with ``fchmod``, so it does not depend on
the umask of whoever ran coherence.

What it refuses, with a one-line :class:`~harness.errors.UserError` naming the path and
exit code 2 at the CLI:

- a target that exists and is not a regular file (a symlink, even to a regular file; a
  FIFO; a device such as /dev/null or /dev/full; a directory): renaming over it would
  destroy it, so it is left untouched. Writing to stdout is the caller's choice (``-``),
  never this module's;
- any OS failure (ENOSPC, EROFS, EACCES, ENOTDIR, EDQUOT, ...): the temporary file is
  removed and the message gives the OS's reason (``strerror``).

Other exceptions (a bug in a serializer) propagate unchanged, also after the temporary
file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from harness.errors import UserError

FILE_MODE = 0o644


def _label(path: Path, what: str | None) -> str:
    return f"{what} {path}" if what else str(path)


def _reason(exc: OSError) -> str:
    return exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or type(exc).__name__


def check_target(path: str | os.PathLike, what: str | None = None) -> Path:
    """Raise UserError unless ``path`` may be replaced by a regular file: it does not
    exist, or it is a regular file (not a symlink). Its folder must exist and be a folder.

    ``what`` names the option the path came from (``--output``), put before the path in
    the message. Returns the path. Touches nothing."""
    path = Path(path)
    label = _label(path, what)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # ENOTDIR (a path under a file), EACCES, ELOOP
        raise UserError(f"{label}: cannot write ({_reason(exc)})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UserError(f"{label}: is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"{label}: folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{label}: {parent} is not a folder")
    return path


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a file"
    return "not a regular file"


def write_with(path: str | os.PathLike, writer: Callable[[IO[bytes]], None], what: str | None = None,
               parents: bool = False, durable: bool = True) -> Path:
    """Write ``path`` atomically: ``writer`` receives a binary file object open on the
    temporary file and writes the content to it. ``parents`` creates missing folders.
    ``durable=False`` skips the fsync (the rename stays atomic for readers, but a power
    loss may leave an empty file): for bulk writes that are redone rather than resumed.

    Returns the path. Raises UserError (see the module docstring) for a target that is
    not a regular file or any OSError; the target is then unchanged and no temporary file
    is left."""
    path = Path(path)
    label = _label(path, what)
    if parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{label}: cannot create its folder ({_reason(exc)})") from None
    check_target(path, what)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            writer(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise UserError(f"{label}: cannot write ({_reason(exc)})") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # already gone, or the folder turned unwritable: nothing more to do
    return path


def write_bytes(path: str | os.PathLike, data: bytes, what: str | None = None, parents: bool = False,
                durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically with mode 0644 (:func:`write_with`)."""
    return write_with(path, lambda f: f.write(data), what, parents, durable)


def write_text(path: str | os.PathLike, text: str, what: str | None = None, parents: bool = False) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically with mode 0644 (:func:`write_with`)."""
    return write_bytes(path, text.encode("utf-8"), what, parents)


def write_json(path: str | os.PathLike, doc, what: str | None = None, indent: int = 2, default=str,
               allow_nan: bool = True) -> Path:
    """Write ``doc`` as JSON text (UTF-8, a final newline) atomically with mode 0644.
    ``default`` and ``allow_nan`` are :func:`json.dumps`'s."""
    text = json.dumps(doc, indent=indent, default=default, allow_nan=allow_nan) + "\n"
    return write_text(path, text, what)


def write_parquet(df, path: str | os.PathLike, what: str | None = None) -> Path:
    """Write a pandas DataFrame as Parquet (pyarrow, no index) atomically with mode 0644."""
    return write_with(path, lambda f: df.to_parquet(f, index=False), what)


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Make sure results can be written under the folder ``path``, before any work is
    done, without leaving anything behind: the folder, or where it is missing its
    nearest existing parent (which it would be created in), must be a folder in which a
    temporary file can be created, written and fsynced; that file is removed at once.
    Returns the path.

    Raises UserError in one line naming the path for: a path that is a file or device
    (``/dev/null``), a path under a file, a read-only or full mount, a pseudo file
    system such as ``/proc``, no permission."""
    path = Path(path)
    label = _label(path, what)
    probe_dir = path
    while True:
        try:
            st = os.stat(probe_dir)
            break
        except FileNotFoundError:
            if probe_dir.parent == probe_dir:
                raise UserError(f"{label}: unusable (no existing parent folder)") from None
            probe_dir = probe_dir.parent
        except OSError as exc:  # ENOTDIR: a path under a file; EACCES; ELOOP
            raise UserError(f"{label}: unusable ({_reason(exc)})") from None
    if not stat.S_ISDIR(st.st_mode):
        where = "is" if probe_dir == path else f"is under {probe_dir}, which is"
        raise UserError(f"{label}: {where} {_kind(st.st_mode)}, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".coherence-probe.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"{label}: cannot write in {probe_dir} ({_reason(exc)})") from None
    try:
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        except OSError as exc:
            raise UserError(f"{label}: cannot write in {probe_dir} ({_reason(exc)})") from None
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return path
