"""A two-node Slurm cluster on 127.0.0.1 for the launch tests: one slurmctld and two
slurmd, all foreground child processes of the test session.

Settings chosen so that it runs in an unprivileged container without munge, systemd
or cgroups (Slurm 22.05 names, slurm.conf(5) of that release):

- ``AuthType=auth/none`` and ``CredType=cred/none``: no munge daemon; any local
  process may talk to the daemons, which is why nothing listens beyond 127.0.0.1
  (``CommunicationParameters=NoCtldInAddrAny,NoInAddrAny``: the daemons bind the
  address their host name resolves to — SlurmctldHost's 127.0.0.1, the nodes'
  NodeAddr — instead of every interface);
- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: processes are
  tracked through /proc, no cgroup is created;
- two ``NodeName`` lines, both ``NodeAddr=127.0.0.1``, each with its own ``Port``; each
  slurmd is started as ``slurmd -N NAME`` (slurmd(8)) so that both run on one host;
- ``SlurmdParameters=config_overrides``: the nodes take the CPUs and memory of their
  NodeName line, not what the host has (two "nodes" share one host's cores);
- state, spool, pid and log files under the cluster's own folder.

Clients (sbatch, srun, scontrol, sinfo) find the cluster through ``SLURM_CONF``, which
:meth:`SlurmCluster.env` sets.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo")
NODES = ("n1", "n2")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed here or its daemons did not come up; the message says why."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies (Linux
    PR_SET_PDEATHSIG, prctl(2)), so a killed pytest leaves no daemon behind; a no-op
    where prctl is not available."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def missing_programs() -> list[str]:
    """The Slurm daemons and clients not found on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/usr/local/sbin"
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def slurm_conf(root: Path, ctld_port: int, node_ports: dict[str, int], cpus: int, user: str) -> str:
    """The slurm.conf text of the test cluster (see the module docstring for why each
    setting). ``node_ports`` maps node name -> slurmd port."""
    lines = [
        "ClusterName=coherence-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/none",
        "CredType=cred/none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
        "SlurmdParameters=config_overrides",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "ReturnToService=2",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=300",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, port in node_ports.items():
        lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} "
                     f"CPUs={cpus} RealMemory=1024 State=UNKNOWN")
    lines.append(f"PartitionName=test Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """One slurmctld and two slurmd (nodes n1, n2) under ``root``.

    ``start()`` raises :class:`SlurmUnavailable` (with the daemon's log tail) when the
    programs are missing or the nodes are not idle within ``start_timeout_s``;
    ``stop()`` ends every daemon it started by its pid (SIGTERM, then SIGKILL after
    ``stop_timeout_s``)."""

    def __init__(self, root: Path, start_timeout_s: float = 30.0, stop_timeout_s: float = 10.0):
        self.root = Path(root)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm clients of this cluster (``SLURM_CONF`` set)."""
        path = os.environ.get("PATH", "")
        if "/usr/sbin" not in path.split(os.pathsep):
            path += os.pathsep + "/usr/sbin"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path, **extra}

    def start(self) -> SlurmCluster:
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} not found; apt-get install slurm-wlm)")
        import getpass

        for sub in ("state", *(f"spool-{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in NODES}
        self.conf.write_text(slurm_conf(self.root, free_port(), ports, max(2, os.cpu_count() or 2), getpass.getuser()))
        env = self.env()
        try:
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)], env)
            for name in NODES:
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)], env)
            self._wait_idle(env)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, key: str, argv: list[str], env: dict) -> None:
        log = open(self.root / f"{key}.out", "wb")  # noqa: SIM115 - closed with the process
        try:
            self.procs[key] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _wait_idle(self, env: dict) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        states = ""
        while time.monotonic() < deadline:
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead[0]} exited with {self.procs[dead[0]].returncode}: {self.log_tail(dead[0])}")
            try:
                out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True,
                                     text=True, timeout=10)
                states = out.stdout.strip()
            except subprocess.TimeoutExpired:
                states = "sinfo timed out"
            seen = dict(line.split() for line in states.splitlines() if len(line.split()) == 2)
            if all(seen.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {self.start_timeout_s:.0f} s (sinfo: {states!r}); "
                               f"slurmctld: {self.log_tail('slurmctld')}")

    def log_tail(self, key: str, lines: int = 5) -> str:
        """The last lines of a daemon's log (its -D output and its LogFile), one string."""
        texts = []
        for path in (self.root / f"{key}.out", self.root / f"{key}.log"):
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()
        return " | ".join(texts[-lines:]) or "(no log)"

    def stop(self) -> None:
        """SIGTERM each daemon started here by its pid, SIGKILL any still alive after
        ``stop_timeout_s``. slurmd first, so that slurmctld sees no node error."""
        order = [k for k in self.procs if k != "slurmctld"] + [k for k in self.procs if k == "slurmctld"]
        for key in order:
            proc = self.procs[key]
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout_s)
        self.procs.clear()
