"""A probe that fills a disk on purpose, for the full-disk tests of the run store.

Loaded as a plugin (suite key `plugins`), never registered in production. The folder to
fill comes from the environment variable COHERENCE_TEST_FILL_DIR (the worker inherits
the test's environment); without it the probe does nothing but a short sleep."""

from __future__ import annotations

import errno
import os
import time

from harness.registry import Kernel, Probe, Work, register

FILL_ENV = "COHERENCE_TEST_FILL_DIR"


class _Nap(Kernel):
    def run(self) -> None:
        time.sleep(0.001)


def fill(folder: str) -> None:
    """Write ``folder``/filler until the file system says ENOSPC (chunks halving down
    to one byte), so nothing more fits there."""
    chunk = 1 << 20
    with open(os.path.join(folder, "filler"), "ab", buffering=0) as f:
        while chunk:
            try:
                f.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2


@register
class FillsDisk(Probe):
    """Fills the folder named by COHERENCE_TEST_FILL_DIR before its repetitions: the
    run store then meets a full disk when it commits this case."""

    name = "testing.fills_disk"
    family = "overhead"
    device_types = ("cpu",)
    params = {}

    def work(self, params, device_info):
        return Work(bound="latency")

    def prepare(self, ctx):
        folder = os.environ.get(FILL_ENV)
        if folder:
            fill(folder)
        return _Nap()
