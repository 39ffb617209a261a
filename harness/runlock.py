"""The run-folder lock: one writer per run folder at a time.

Two ``coherence run --resume`` of one partial run (or a resume while the run is still
going, or a ``collect`` during either) would each append the same cases to the journal
and merge the same parts, leaving duplicate rows and samples. Every command that writes
a run folder therefore holds an exclusive ``flock(2)`` on ``<run>/.lock`` for as long
as it writes; readers (show, compare, export, report of another folder) take nothing.

Why ``flock`` on an open file, and the pid only as information: the kernel drops a
flock when the last descriptor of its open file description closes, which includes
the death of the holder by any signal (flock(2), Linux man-pages). So a lock left by a
killed run is never "stale" in the sense of being held: the next writer simply gets
it, whatever the file still says. The file is never deleted (unlinking a lock file
races with a process that has opened the old inode and would lock a file nobody else
sees); its contents (``pid``, ``command``, ``since``) only serve the one-line error of
a second writer. The descriptor is opened close-on-exec (Python's default, PEP 446),
so worker and rank processes never inherit the lock and never keep it alive.

A results folder on NFS works too: since Linux 2.6.12 the NFS client emulates flock as
a whole-file byte-range lock, which the server arbitrates across clients (flock(2),
NOTES). POSIX only (``fcntl``); elsewhere the lock is a no-op that says so in ``held``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from harness.errors import UserError

LOCK_NAME = ".lock"
# A holder writes its pid right after it gets the lock; a second writer that finds the
# file still empty waits this long for it before naming no pid.
HOLDER_WAIT_S = 0.5


class RunLock:
    """An exclusive, non-blocking lock on one run folder.

    ``RunLock(run_path, command).acquire()`` returns the lock held (use it as a context
    manager, or call :meth:`release`). ``command`` is what the holder is doing, shown to
    a second writer ("coherence run --resume"). Raises :class:`UserError` (exit 2, one
    line) when another process holds the lock: "run X is in use by pid N (command);
    wait for it or stop it", or when the lock file cannot be opened (a read-only run
    folder, say)."""

    def __init__(self, run_path: Path | str, command: str):
        self.path = Path(run_path)
        self.file = self.path / LOCK_NAME
        self.command = command
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock to take, nothing to name
            return self
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{self.file}: cannot open the run lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = f"pid {holder['pid']}" if holder.get("pid") else "another process"
            what = f" ({holder['command']})" if holder.get("command") else ""
            raise UserError(f"run {self.path.name} is in use by {who}{what}; wait for it or stop it") from None
        except OSError as exc:
            os.close(fd)
            raise UserError(f"{self.file}: cannot lock ({exc.strerror})") from None
        self.fd = fd
        # Who holds it, for the next writer's message. A failure to write this (a full
        # disk) does not weaken the lock itself, so it is not an error.
        doc = json.dumps({"pid": os.getpid(), "command": self.command,
                          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, doc.encode(), 0)
        except OSError:
            pass
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The pid stays in the file: it is information,
        the flock is the lock."""
        if self.fd is None:
            return
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    """The holder's ``{"pid", "command", "since"}`` from the lock file, or {} when it
    has not written it (yet) or wrote something else."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            data = os.pread(fd, 4096, 0)
        except OSError:
            return {}
        if data.strip() or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    try:
        doc = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def lock_run(run_path: Path | str, command: str) -> RunLock:
    """Acquire and return the lock of ``run_path`` (see :class:`RunLock`)."""
    return RunLock(run_path, command).acquire()
