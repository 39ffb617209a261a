"""Running one case in this process: context, skip rules, the backend's kernel, the
correctness check and the timed repetitions.

Used by the case worker (harness.worker), by each rank of a multi-rank case
(harness.ranks) and under torchrun (harness.distributed); it imports none of them.
A case's skip rules (``Probe.skip_reason``) are checked here once, before the
backend's kernel builder runs (harness.registry.kernel_entry).

Each case's energy (harness.energy) is read around its timed repetitions only: the
meter starts at the first timed repetition (after warm-up and the check) and stops when
the last one has synchronized. A kernel with its own ``measure`` (warm-up inside) is
metered around that call with the counter sampled, and the window is cut to start at its
first timed repetition (``sample_t_start_ns``), or kept whole with a note when it has none.
"""

from __future__ import annotations

import traceback

from harness import backends, energy, registry
from harness.errors import ProbeCheckFailed, ProbeSkip
from harness.timing import TimingPolicy, measure


def case_context(spec: dict) -> registry.CaseContext:
    """The :class:`~harness.registry.CaseContext` of a case spec (the dict the runner
    sends: case_id, probe, params, device, device_info, backend, host, seed, and for a
    rank of a multi-rank case rank, world_size, group_devices)."""
    world_size = spec.get("world_size", 1)
    rank = spec.get("rank", 0)
    group_devices = spec.get("group_devices") or [spec["device"]]
    return registry.CaseContext(
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


def prepare_case(ctx: registry.CaseContext, probe: registry.Probe | None = None) -> registry.Kernel:
    """The prepared kernel of one case: the backend enters the case (seeds, current
    device), the probe's skip rules are checked (once, here), then the backend's
    kernel builder runs.

    Raises :class:`~harness.errors.ProbeSkip` when the case cannot run here (its skip
    rules, no kernel on this backend, or what the builder learns, e.g. free memory);
    anything else the builder raises is the case's failure."""
    probe = probe or registry.get(ctx.probe)()
    backends.get(ctx.backend).enter(ctx)
    reason = probe.skip_reason(ctx.params, ctx.device_info, ctx.host)
    if reason:
        raise ProbeSkip(reason)
    entry = registry.kernel_entry(type(probe), ctx.backend)
    if entry is None:
        raise ProbeSkip(f"{ctx.probe} has no kernel for the {ctx.backend} backend")
    kernel = entry.build(probe, ctx)
    if not isinstance(kernel, registry.Kernel):
        # Say whose bug it is, rather than an AttributeError from the first kernel.run().
        raise TypeError(f"the {ctx.backend} kernel builder of {ctx.probe} ({entry.module}) returned "
                        f"{type(kernel).__name__}, not a harness.registry.Kernel")
    return kernel


def run_case(spec: dict) -> dict:
    """Prepare, check and time one case in this process. Never raises: every outcome is
    a status with a reason."""
    ctx = case_context(spec)
    world_size = ctx.world_size
    policy = TimingPolicy(**spec["timing"])
    result: dict = {"status": "ok", "reason": "", "durations_s": [], "t_start_ns": [], "extra": {}}
    kernel = None
    meter = None
    try:
        probe = registry.get(ctx.probe)()
        kernel = prepare_case(ctx, probe)
        custom = None
        # Warm-up and check before timing, so a wrong kernel costs no timed budget.
        kernel.run()
        kernel.check()
        # Made after prepare, so CUDA is initialized and its PCI addresses place the GPU.
        meter = energy.CaseEnergy(energy_devices(ctx))
        own_measure = type(kernel).measure is not registry.Kernel.measure
        if own_measure:
            meter.start(track=True)  # sampled, so the kernel's own warm-up can be cut off
        custom = kernel.measure(policy)
        if custom is not None:
            meter.stop()
            starts = list(getattr(kernel, "sample_t_start_ns", None) or [])
            meter.trim(min(starts) * 1e-9 if starts else None)
            result.update(durations_s=list(custom), t_start_ns=starts if len(starts) == len(custom) else [],
                          warmup=1, stop_reason="custom", timer="custom")
        else:
            meter.discard()
            # Only ranks in a torch.distributed group agree on stopping; a mesh backend's
            # multi-device case runs in this one process.
            ranks = world_size > 1 and backends.get(ctx.backend).groups == "ranks"
            agree = _agreement(ctx.device) if ranks else None
            clock = backends.get(ctx.backend).clock_for(ctx.device, kernel.timer, getattr(kernel, "sync", None))
            m = measure(kernel.run, meter.wrap(clock), policy, kernel.before_each, agree)
            meter.stop()  # the last repetition's clock has synchronized the device
            result.update(
                durations_s=m.durations_s,
                t_start_ns=m.t_start_ns,
                warmup=m.warmup + 1,
                stop_reason=m.stop_reason,
                timer=m.timer,
            )
        result["energy"] = meter.reading(len(result["durations_s"]))
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
        if meter is not None:
            meter.close()
        if "energy" not in result:
            # Every case has a reading; one that never timed says why.
            why = result["reason"] or "no timed repetitions"
            result["energy"] = energy.empty_reading(meter.scope if meter else ctx.device,
                                                    f"case {result['status']}: {why}"[:300])
        if kernel is not None:
            try:
                kernel.close()
            except Exception:  # noqa: BLE001 - a failing cleanup must not hide the result
                pass
            if kernel.extra and not result["extra"]:
                result["extra"] = dict(kernel.extra)
    return result


def energy_devices(ctx: registry.CaseContext) -> list[str]:
    """The devices this process meters for a case: its own device, or for a mesh
    backend's multi-device case (one process drives the group) every group device.
    A rank of a ``ranks`` group meters only its own; harness.ranks.combine adds them."""
    if ctx.world_size > 1 and backends.get(ctx.backend).groups != "ranks":
        return list(ctx.group_devices)
    return [ctx.device]


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


def send(conn, message) -> bool:
    """Send ``message`` on a pipe; False when the other end is gone (its end closed),
    so the caller ends quietly instead of dying with a BrokenPipeError traceback on a
    terminal nobody reads."""
    try:
        conn.send(message)
    except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
        return False
    return True
