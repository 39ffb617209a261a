"""The case worker: a child process that prepares, checks and times cases one at a time.

The runner keeps one worker alive across cases (so torch is imported once), sends it a
case, and waits for the answer with the case's timeout. If the worker dies (a crash in
native code, an ``os._exit``) or overruns, the runner kills its whole process group and
starts a fresh one; the case is recorded with that status and reason. The worker leads
its own session so that whatever it starts (ranks, helpers) goes with it.
"""

from __future__ import annotations

import os

from harness import backends, registry
from harness.execute import run_case, send


# Multi-host JAX: every host's worker joins one JAX runtime before JAX starts, so the
# collective probes' mesh spans the devices of all hosts (see README, "JAX backend").
JAX_COORDINATOR_ENV = "COHERENCE_JAX_COORDINATOR"  # host:port of process 0
JAX_NUM_PROCESSES_ENV = "COHERENCE_JAX_NUM_PROCESSES"
JAX_PROCESS_ID_ENV = "COHERENCE_JAX_PROCESS_ID"


def init_jax_distributed() -> dict:
    """``jax.distributed.initialize`` from the COHERENCE_JAX_* variables (``auto`` as the
    coordinator lets JAX detect a TPU pod, Slurm or Open MPI itself)."""
    import jax

    coordinator = os.environ[JAX_COORDINATOR_ENV]
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ[JAX_NUM_PROCESSES_ENV]),
            process_id=int(os.environ[JAX_PROCESS_ID_ENV]),
        )
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def worker_main(conn, plugins: list[str], parent_pid: int | None = None, parent_main_thread: bool = True) -> None:
    """Entry point of the worker process: announce readiness, then serve cases.

    ``parent_pid``: the runner's pid. The worker leads its own session (so the runner
    can kill it with everything it started as one group), dies with the runner
    (:func:`harness.lifeline.die_with_parent`) and forks the group reaper that takes
    the rest of the group with it (:func:`harness.lifeline.start_group_reaper`). A
    runner that went away mid-case is never answered: no BrokenPipeError traceback."""
    from harness import lifeline

    try:
        os.setsid()
    except OSError:
        pass
    lifeline.die_with_parent(parent_pid, parent_main_thread, on_orphan=lifeline.kill_own_group)
    if parent_pid is not None:
        lifeline.start_group_reaper()
    try:
        registry.discover(plugins)
        for name in backends.known():
            # Import each framework once here, not inside the first case.
            start = backends.get(name).start_worker
            if start is not None:
                start()

        if os.environ.get(JAX_COORDINATOR_ENV):
            init_jax_distributed()
    except Exception as exc:  # noqa: BLE001
        send(conn, {"ready": False, "reason": f"{type(exc).__name__}: {exc}"})
        return
    if not send(conn, {"ready": True, "pid": os.getpid()}):
        return
    pool = None
    try:
        while True:
            try:
                spec = conn.recv()
            except (EOFError, OSError):
                return
            if spec is None:
                return
            if spec.get("world_size", 1) > 1 and spec.get("backend") != "jax":
                result, pool = run_multi_rank(spec, pool, plugins)
            else:
                result = run_case(spec)
            if not send(conn, result):
                return
    finally:
        if pool is not None:
            pool.close()


def run_multi_rank(spec: dict, pool, plugins: list[str]):
    """Run a case on a pool of rank processes (reused while cases keep the same group
    shape and succeed); returns the combined result and the pool to keep."""
    from harness.ranks import RankPool, combine

    devices = spec["group_devices"]
    timeout_s = spec.get("group_timeout_s", 60.0)
    if pool is not None and pool.key != (tuple(devices), timeout_s):
        pool.close()
        pool = None
    if pool is None:
        pool = RankPool(devices, timeout_s, plugins)
        failure = pool.start()
        if failure:
            status = "timeout" if "never joined" in failure or "timed out" in failure.lower() else "failed"
            return {"status": status, "reason": failure}, None
    result = combine(pool.run(spec), len(devices))
    if result["status"] != "ok":
        pool.close()
        pool = None
    return result, pool
