"""SIGINT and SIGTERM on ``coherence run``: stop at once, but never mid-commit.

Ctrl-C (SIGINT) and a scheduler's or ``timeout``'s SIGTERM should stop a run now: the
case in flight is abandoned (its worker and rank group killed by the runner), recorded
as ``interrupted``, and the run stays ``partial`` so ``--resume`` completes it. The
exit code is the shell's convention for death by a signal, 128 + its number: 130 for
SIGINT, 143 for SIGTERM (Bash manual, "Exit Status").

Stopping "now" must not tear a write in half: a journal line, a part file, the manifest
or the finalize merge. :class:`SignalGate` turns the signal into a
:class:`RunInterrupted` exception raised where the main thread is (typically waiting on
the worker), except inside ``deferred()`` sections: there the signal is only noted and
raised when the section ends. Only the first signal raises; later ones (a second
Ctrl-C during the clean-up) are noted and ignored, so the clean-up is not itself
interrupted.

Python runs signal handlers in the main thread only; outside it :func:`install` does
nothing and the process keeps the default behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """``coherence run`` got SIGINT or SIGTERM. A BaseException (like KeyboardInterrupt)
    so that no ``except Exception`` on the way turns it into a case failure.

    ``signum``: the signal; ``name``: "SIGINT" / "SIGTERM"; ``exit_code``: 128 + signum."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGate:
    """Raises :class:`RunInterrupted` on SIGINT/SIGTERM, deferred inside ``deferred()``."""

    def __init__(self):
        self.pending: int | None = None  # the first signal received
        self.fired = False  # RunInterrupted was raised once already
        self._depth = 0
        self._previous: dict = {}

    def install(self) -> "SignalGate":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum
        if self._depth == 0:
            self._fire()

    def _fire(self) -> None:
        if self.pending is not None and not self.fired:
            self.fired = True
            raise RunInterrupted(self.pending)

    @contextlib.contextmanager
    def deferred(self):
        """A section a signal must not cut (a commit): the signal is raised after it."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0:
            self._fire()

    def check(self) -> None:
        """Raise now if a signal came while deferred and was not raised yet."""
        if self._depth == 0:
            self._fire()


_NULL = SignalGate()  # never installed: deferred() is then a plain block
_current: SignalGate | None = None


def install() -> SignalGate:
    """Install a gate for this process (the ``coherence run`` command); the runner's
    commits use :func:`deferred`. Call :func:`uninstall` when the command ends."""
    global _current
    _current = SignalGate().install()
    return _current


def uninstall() -> None:
    global _current
    if _current is not None:
        _current.restore()
    _current = None


def deferred():
    """``with deferred():`` around a write that a signal must not cut in half (no-op
    when no gate is installed, e.g. the runner used as a library)."""
    return (_current or _NULL).deferred()
