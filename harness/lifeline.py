"""Processes the runner starts die with the process that started them.

The case worker and the rank processes are children of ``coherence run`` (ranks: of
the worker). If the parent is killed (SIGKILL, the OOM killer, a crash) nobody is left
to enforce the case timeout, and a hung case would run on for ever, orphaned. Three
layers make sure it does not:

1. **Parent-death signal.** On Linux a child asks the kernel for SIGKILL when its
   parent dies: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (prctl(2); constant 1 in
   <linux/prctl.h>). The request is made by the child, so there is a race with a
   parent that died just before it: the child checks ``getppid()`` against the pid the
   parent gave it right after arming, and leaves if they differ. The kernel sends the
   signal when the parent *thread* that created the child exits, so it is armed only
   when the parent started the child from its main thread (the caller says so).
2. **Watchdog** (where 1 is unavailable: not Linux, or the child was started from
   another thread): a daemon thread polls ``getppid()`` every ``WATCHDOG_PERIOD_S``; a
   change means the parent is gone (the child was re-parented) and the child ends
   its process group or itself.
3. **Group reaper** (the worker only): the worker leads its own session, so ranks and
   whatever a probe starts (a ``subprocess`` we do not control) share its process
   group. A parent-death signal kills the worker but not those. The worker forks a
   tiny reaper into its group that blocks on a pipe only the worker holds; when the
   worker is gone, however it went, the pipe reads EOF and the reaper SIGKILLs the
   whole group, itself included.

Nothing here is imported by probes; harness.worker and harness.ranks call it at start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.25
# Exit code of a child that found its parent already gone at start (EX_SOFTWARE-like;
# nobody reads it, the parent is dead).
ORPHAN_EXIT = 70


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits
    (Linux ``prctl(PR_SET_PDEATHSIG)`` through ctypes). True when armed; False where
    the call does not exist or fails (then use :func:`start_watchdog`)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def start_watchdog(parent_pid: int, on_orphan=None, period_s: float = WATCHDOG_PERIOD_S) -> threading.Thread:
    """A daemon thread that calls ``on_orphan()`` (default: SIGKILL this process) as
    soon as ``os.getppid()`` is no longer ``parent_pid``."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(period_s)
        (on_orphan or _kill_self)()

    thread = threading.Thread(target=watch, name="coherence-watchdog", daemon=True)
    thread.start()
    return thread


def die_with_parent(parent_pid: int | None, main_thread: bool = True, on_orphan=None) -> str:
    """Make this process end when ``parent_pid`` (its parent) ends: the parent-death
    signal where it can be armed (``main_thread``: the parent started us from its main
    thread), else the watchdog. If the parent is already gone, ``on_orphan()`` (default:
    exit now). Returns how: ``"pdeathsig"``, ``"watchdog"`` or ``"none"`` (no pid given)."""
    if parent_pid is None:
        return "none"
    armed = main_thread and set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        (on_orphan or _kill_self)()
    if armed:
        return "pdeathsig"
    start_watchdog(parent_pid, on_orphan)
    return "watchdog"


def kill_own_group() -> None:
    """SIGKILL this process's whole group (this process included)."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(ORPHAN_EXIT)


def start_group_reaper() -> int | None:
    """Fork the group reaper (layer 3 above) into this process's group; returns its pid,
    or None where ``fork`` is unavailable. Call it while this process has no other
    thread (at start), after it became its group's leader."""
    if not hasattr(os, "fork"):
        return None
    read_end, write_end = os.pipe()  # close-on-exec: exec'd children never hold it
    pid = os.fork()
    if pid:
        os.close(read_end)
        # The write end stays open in this process for its lifetime (deliberately never
        # closed): its closing, at this process's death, is the reaper's signal.
        _REAPER_PIPE.append(write_end)
        return pid
    try:
        # Hold nothing of the worker's: not its pipe to the runner (the runner must see
        # EOF when the worker dies), not multiprocessing's resource-tracker pipe.
        _close_all_but(read_end)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while os.read(read_end, 1):
            pass
    except BaseException:  # noqa: BLE001 - whatever happens, the group goes
        pass
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(0)


_REAPER_PIPE: list[int] = []


def _close_all_but(keep: int) -> None:
    """Close every descriptor above stderr except ``keep``: those listed in
    /proc/self/fd where there is one (a loop up to a container's RLIMIT_NOFILE of 10⁹
    would take minutes on kernels without close_range), else up to 65536."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 65536))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _kill_self() -> None:
    os._exit(ORPHAN_EXIT)
