"""`coherence run` under torchrun: join the launcher's group instead of spawning ranks.

When RANK and WORLD_SIZE (> 1) are in the environment, every launched process runs
the same `coherence run`. They join one torch.distributed group (env://, the launcher's
MASTER_ADDR/MASTER_PORT; NCCL with one GPU per local rank, else Gloo) and run the
suite's multi-rank probes together at world size = WORLD_SIZE, each process as its
rank, in-process. A separate Gloo group carries control traffic (the plan, the
results), so a collective that times out on the data group cannot take the
bookkeeping with it. Global rank 0 owns the run folder: it writes the manifest (with
every rank's host, device and virtualization summary), the cases and the samples, then
runs the suite's single-device cases on its own node the usual way (isolated worker).
The other ranks leave once the multi-rank cases are done.

This is how multi-node runs work (configs/launch/: torchrun, Slurm, Kubernetes).
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

from harness import environment, interrupts, store
from harness.config import Suite, parse_suite
from harness.errors import UserError
from harness.execute import run_case
from harness.ranks import combine, init_group
from harness.plan import host_facts, plan, resolve_devices, select_probes
from harness.runner import (
    RunOutcome,
    case_row,
    device_nominal_table,
    execute,
    samples_frame,
    start_run,
)
from harness.telemetry import TelemetrySampler, summarize_case

GROUP_PREFIX = "torchrun"


def launcher_env() -> dict | None:
    """The torchrun/Slurm/Kubernetes launch facts, or None when not launched so."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not an integer") from None
    if "RANK" not in env or world <= 1:
        return None
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in env:
            raise UserError(f"RANK/WORLD_SIZE are set but {key} is not: launch with torchrun or set it")
    return {
        "rank": int(env["RANK"]),
        "world_size": world,
        "local_rank": int(env.get("LOCAL_RANK", "0")),
        "local_world_size": int(env.get("LOCAL_WORLD_SIZE", "1")),
        "node_rank": int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
        "master_addr": env["MASTER_ADDR"],
        "master_port": int(env["MASTER_PORT"]),
        "run_id": env.get("TORCHELASTIC_RUN_ID"),
    }


def _rank_device(launch: dict, devices_spec: str | None) -> dict:
    """cuda:LOCAL_RANK when GPUs are selected (or by default where present), else cpu:0."""
    available = environment.torch_devices()
    chosen = resolve_devices(devices_spec, available)
    gpus = [d for d in chosen if d["type"] == "cuda"]
    if gpus:
        if launch["local_rank"] >= len(gpus):
            raise UserError(
                f"LOCAL_RANK {launch['local_rank']} has no GPU ({len(gpus)} selected): "
                "use --nproc-per-node equal to the GPUs per node, or --devices cpu"
            )
        return gpus[launch["local_rank"]]
    return next(d for d in available if d["type"] == "cpu")


def run_under_launcher(
    launch: dict,
    suite: Suite,
    suite_doc: dict,
    probe_names: tuple[str, ...],
    devices_spec: str | None,
    out,
    label: str,
    timeout_s: float | None,
    anonymize: bool,
    quiet: bool,
    report: bool = True,
    take_lock=None,
) -> RunOutcome | None:
    """Run as one rank of the launcher's group; rank 0 returns the outcome, the others
    return None once the multi-rank cases are done.

    ``take_lock(path, command)`` (run_command's guard) locks the run folder rank 0
    creates (harness.runlock); rank 0's commits and finalize are not cut by
    SIGINT/SIGTERM (harness.interrupts.deferred)."""
    import torch.distributed as dist

    rank, world = launch["rank"], launch["world_size"]
    device = _rank_device(launch, devices_spec)
    group_timeout = min(suite.group_timeout_s, timeout_s or suite.group_timeout_s)
    init_group(rank, world, device["id"], None, group_timeout)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(group_timeout, 60.0) * 4))
    try:
        # Rank 0's suite is the plan for everyone, whatever files the other nodes hold.
        shared = [suite_doc if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0, group=control)
        suite = parse_suite(shared[0], f"{suite.source} (from rank 0)")
        entries = select_probes(suite, probe_names)
        env = environment.collect(anonymize=anonymize)
        host = host_facts(env)
        summary = {
            "rank": rank,
            "node_rank": launch["node_rank"],
            "local_rank": launch["local_rank"],
            "host": env.get("host", {}).get("hostname", {}).get("value") if anonymize else socket.gethostname(),
            # The scheduler's name for the node (Slurm's SLURMD_NODENAME): tells nodes
            # apart where host names do not (several slurmd per host, containers);
            # withheld under --anonymize, as node names are often host names.
            "slurm_node": None if anonymize else os.environ.get("SLURMD_NODENAME"),
            "device": device["id"],
            "device_name": device.get("name"),
            "virtualization": (env.get("virtualization") or {}).get("summary"),
        }
        ranks_info = [None] * world if rank == 0 else None
        dist.gather_object(summary, ranks_info, dst=0, group=control)

        dev_type = device["type"]
        # Each rank brings one device: plan as if the node had `world` of them.
        cases = [
            c for c in plan(suite, entries, [device] * world, "torch", host, cpu_ranks=world)
            if c.world_size == world
        ]
        group_name = f"{GROUP_PREFIX}:{dev_type}x{world}"
        renamed = {}
        for case in cases:
            renamed[case.case_id] = case.case_id.rsplit("@", 1)[0] + f"@{group_name}"
            case.case_id = renamed[case.case_id]
            case.device = group_name
        # Composites' component ids follow their cases' new names (single-device
        # components keep theirs: rank 0 runs them on its node afterwards).
        for case in cases:
            case.components = [{**p, "case_id": renamed.get(p["case_id"], p["case_id"])} for p in case.components]

        run_store = None
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with interrupts.deferred():
                run_store, nominals = start_run(suite, shared[0], out, [device], probe_names, "torch", label, timeout_s,
                                                env)
                if take_lock is not None:
                    take_lock(run_store.path, "coherence run (torchrun rank 0)")
            config = run_store.manifest()["config"]
            config["launcher"] = launch
            run_store.update_manifest(
                config=config,
                ranks=ranks_info,
                sessions=[{"started_at": store.utc_now(), "t0_monotonic_ns": time.monotonic_ns(), "launcher": "torchrun"}],
            )
            if not quiet:
                print(f"run {run_store.path.name} → {run_store.path} ({world} ranks)", flush=True)
        t0 = [time.monotonic_ns()]
        dist.broadcast_object_list(t0, src=0, group=control)  # one timeline (same boot only)
        sampler = TelemetrySampler(t0[0]).start() if rank == 0 else None
        try:
            for case in cases:
                if sampler:
                    sampler.take()
                    sampler.case_id = case.case_id
                if case.skip:
                    result = {"status": "skipped", "reason": case.skip}
                else:
                    spec = {
                        "case_id": case.case_id, "probe": case.probe, "params": case.params,
                        "device": device["id"], "device_info": device, "backend": "torch",
                        "host": host, "seed": 0,
                        "timing": {k: v for k, v in case.timing.items() if k != "timeout_s"},
                        "rank": rank, "world_size": world, "group_devices": [device["id"]] * world,
                    }
                    mine = run_case(spec)
                    gathered = [None] * world if rank == 0 else None
                    dist.gather_object(mine, gathered, dst=0, group=control)
                    result = combine(gathered, world) if rank == 0 else None
                if rank == 0:
                    telemetry = sampler.take()
                    sampler.case_id = ""
                    row = case_row(case, result, nominals.get(device["id"], {}))
                    row.update(summarize_case(telemetry, case.device))
                    with interrupts.deferred():
                        run_store.append_case(row, samples_frame(case.case_id, result, t0[0]), telemetry)
                    if not quiet:
                        print(f"{result['status']:>8}  {case.case_id}", flush=True)
        finally:
            if sampler:
                sampler.stop()
        dist.barrier(group=control)
    finally:
        dist.destroy_process_group()

    if rank != 0:
        return None
    # Single-device cases: this node's devices, in the isolated worker as usual.
    local_devices = resolve_devices(devices_spec, environment.torch_devices())
    local = [c for c in plan(suite, entries, local_devices, "torch", host) if c.world_size == 1]
    nominals = device_nominal_table(local_devices, env, suite.nominal)
    outcome = execute(local, run_store, local_devices, nominals, host, suite.plugins, timeout_s, None)
    with interrupts.deferred():
        run_store.finalize("complete")
    from harness.finish import collect_into, report_into

    collect_into(run_store.path)
    if report:
        report_into(run_store.path)
    if quiet:
        print(run_store.path)
    else:
        print(f"done: {', '.join(f'{v} {k}' for k, v in sorted(outcome.counts.items()))}", flush=True)
    return outcome

