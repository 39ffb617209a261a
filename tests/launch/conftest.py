"""The launch tests' Slurm: one slurmctld and two slurmd on 127.0.0.1 for the session.

Skips (with the reason) where Slurm is not installed or its daemons do not come up;
`.ci/run` installs Debian's slurm-wlm when it runs as root.
"""

from __future__ import annotations

import pytest

from tests.launch.slurm_cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A started :class:`SlurmCluster` (nodes n1 and n2, partition ``test``); every
    daemon is stopped by its pid at the end of the session."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
