"""The case worker: a child process that prepares, checks and times cases one at a time.

The runner keeps one worker alive across cases (so torch is imported once), sends it a
case, and waits for the answer with the case's timeout. If the worker dies (a crash in
native code, an ``os._exit``) or overruns, the runner kills its whole process group and
starts a fresh one; the case is recorded with that status and reason. The worker leads
its own session so that whatever it starts (ranks, helpers) goes with it.
"""

from __future__ import annotations

import os
import traceback

from harness import registry
from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.timing import TimingPolicy, clock_for, measure


def run_case(spec: dict) -> dict:
    """Prepare, check and time one case in this process. Never raises: every outcome is
    a status with a reason."""
    probe_cls = registry.get(spec["probe"])
    world_size = spec.get("world_size", 1)
    rank = spec.get("rank", 0)
    group_devices = spec.get("group_devices") or [spec["device"]]
    ctx = registry.CaseContext(
        case_id=spec["case_id"],
        probe=spec["probe"],
        params=spec["params"],
        device=group_devices[rank] if world_size > 1 else spec["device"],
        device_info=spec["device_info"],
        backend=spec["backend"],
        host=spec["host"],
        seed=spec.get("seed", 0),
        rank=rank,
        world_size=world_size,
        group_devices=group_devices,
    )
    policy = TimingPolicy(**spec["timing"])
    result: dict = {"status": "ok", "reason": "", "durations_s": [], "t_start_ns": [], "extra": {}}
    kernel = None
    try:
        _seed(spec.get("seed", 0), ctx.backend)
        if ctx.backend == "torch" and ctx.device.startswith("cuda"):
            import torch

            # Events record on the current device's stream: make it the case's device.
            torch.cuda.set_device(torch.device(ctx.device))
        probe = probe_cls()
        kernel = probe.prepare(ctx)
        custom = None
        # Warm-up and check before timing, so a wrong kernel costs no timed budget.
        kernel.run()
        kernel.check()
        custom = kernel.measure(policy)
        if custom is not None:
            starts = list(getattr(kernel, "sample_t_start_ns", None) or [])
            result.update(durations_s=list(custom), t_start_ns=starts if len(starts) == len(custom) else [],
                          warmup=1, stop_reason="custom", timer="custom")
        else:
            # JAX multi-device cases run in this one process over a mesh: no ranks to agree.
            agree = _agreement(ctx.device) if world_size > 1 and ctx.backend != "jax" else None
            clock = clock_for(ctx.device, kernel.timer, getattr(kernel, "sync", None))
            m = measure(kernel.run, clock, policy, kernel.before_each, agree)
            result.update(
                durations_s=m.durations_s,
                t_start_ns=m.t_start_ns,
                warmup=m.warmup + 1,
                stop_reason=m.stop_reason,
                timer=m.timer,
            )
        result["sample_columns"] = sample_columns(kernel, len(result["durations_s"]))
        result["extra"] = dict(kernel.extra)
        work = kernel.work or probe.work(ctx.params, ctx.device_info)
        result["work"] = {"flops": work.flops, "bytes": work.bytes, "bound": work.bound, "dtype": work.dtype,
                          "collective": work.collective, "link": work.link,
                          "peak_dtype": work.peak_dtype}
        result["resolved_params"] = kernel.params or ctx.params
    except ProbeSkip as exc:
        result.update(status="skipped", reason=str(exc))
    except ProbeCheckFailed as exc:
        result.update(status="failed", reason=f"correctness check failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - any probe error is that case's failure
        result.update(
            status="failed",
            reason=f"{type(exc).__name__}: {exc}".strip()[:500],
            detail=traceback.format_exc(limit=20),
        )
    finally:
        if kernel is not None:
            try:
                kernel.close()
            except Exception:  # noqa: BLE001 - a failing cleanup must not hide the result
                pass
            if kernel.extra and not result["extra"]:
                result["extra"] = dict(kernel.extra)
    return result


def sample_columns(kernel, reps: int) -> dict:
    """The kernel's per-repetition columns as plain floats; a column that is not one
    value per timed repetition is the probe's bug and fails the case."""
    columns = getattr(kernel, "sample_columns", None) or {}
    out = {}
    for name, values in columns.items():
        if name in ("case_id", "rank", "rep", "t_start_s", "duration_s"):
            raise ValueError(f"sample column {name!r} would overwrite a schema column")
        values = [float(v) for v in values]
        if len(values) != reps:
            raise ValueError(f"sample column {name!r} has {len(values)} values for {reps} timed repetitions")
        out[str(name)] = values
    return out


def _agreement(device: str):
    """agree(stop) across the default group: True when any rank wants to stop."""
    import torch
    import torch.distributed as dist

    flag = torch.zeros(1, dtype=torch.int32, device=device if device.startswith("cuda") else "cpu")

    def agree(stop: bool) -> bool:
        flag.fill_(1 if stop else 0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    return agree


def _seed(seed: int, backend: str) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    if backend == "torch":
        import torch

        torch.manual_seed(seed)


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
        import torch  # noqa: F401 - import once here, not inside the first timed case

        if os.environ.get(JAX_COORDINATOR_ENV):
            init_jax_distributed()
    except Exception as exc:  # noqa: BLE001
        _send(conn, {"ready": False, "reason": f"{type(exc).__name__}: {exc}"})
        return
    if not _send(conn, {"ready": True, "pid": os.getpid()}):
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
            if not _send(conn, result):
                return
    finally:
        if pool is not None:
            pool.close()


def _send(conn, message) -> bool:
    """Send ``message`` to the runner; False when the runner is gone (its end closed),
    so the caller ends quietly instead of dying with a BrokenPipeError traceback on a
    terminal nobody reads."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        return False
    return True


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
