"""`coherence run`: from command-line options to a finished run folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness import environment, registry, store
from harness.config import load_suite, read_yaml, suite_path
from harness.distributed import launcher_env, run_under_launcher
from harness.errors import UserError
from harness.runner import (
    RunOutcome,
    device_nominal_table,
    execute,
    host_facts,
    plan,
    resolve_devices,
    select_probes,
    start_run,
    suite_from_manifest,
)

DEFAULT_SUITE = "quick"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def run_suite(
    suite_ref: str | None,
    devices_spec: str | None,
    probe_names: tuple[str, ...],
    backend: str,
    out: Path,
    label: str,
    resume: str | None,
    timeout_s: float | None,
    anonymize: bool,
    quiet: bool,
    cpu_ranks: int | None = None,
) -> RunOutcome:
    if resume:
        given = [name for name, v in (("--suite", suite_ref), ("--devices", devices_spec), ("--probe", probe_names),
                                      ("--label", label), ("--cpu-ranks", cpu_ranks)) if v]
        if given:
            raise UserError(f"--resume replays the run's own configuration; drop {', '.join(given)}")
        return _resume(resume, out, timeout_s, quiet)

    ref = suite_ref or DEFAULT_SUITE
    suite = load_suite(ref)
    suite_doc = read_yaml(suite_path(ref))
    entries = select_probes(suite, probe_names)
    launch = launcher_env()
    if launch:
        outcome = run_under_launcher(launch, suite, suite_doc, probe_names, devices_spec, out, label, timeout_s, anonymize, quiet)
        return outcome or RunOutcome(path=out)
    env = environment.collect(anonymize=anonymize)
    devices = resolve_devices(devices_spec, environment.torch_devices())
    host = host_facts(env)
    cases = plan(suite, entries, devices, backend, host, cpu_ranks)
    if not cases:
        raise UserError(f"suite '{suite.name}' has no case for devices {', '.join(d['id'] for d in devices)}")
    out.mkdir(parents=True, exist_ok=True)
    t0_ns = time.monotonic_ns()
    run_store, nominals = start_run(suite, suite_doc, out, devices, probe_names, backend, label, timeout_s, env)
    manifest = run_store.manifest()
    manifest["config"]["cpu_ranks"] = cpu_ranks or suite.cpu_ranks
    run_store.update_manifest(
        config=manifest["config"],
        sessions=[{"started_at": store.utc_now(), "t0_monotonic_ns": t0_ns, "boot_id": _boot_id()}],
        planned_cases=len(cases),
    )
    return _execute(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns)


def _resume(ref: str, out: Path, timeout_s: float | None, quiet: bool) -> RunOutcome:
    path = store.resolve_run(ref, out)
    run_store = store.RunStore.reopen(path)
    manifest = run_store.manifest()
    suite = suite_from_manifest(manifest)
    config = manifest["config"]
    env = manifest["environment"]
    registry.discover(suite.plugins)
    wanted = config.get("devices") or []
    available = {d["id"]: d for d in environment.torch_devices()}
    missing = [d for d in wanted if d not in available]
    if missing:
        raise UserError(f"--resume {ref}: device(s) {', '.join(missing)} of the run are not on this node")
    devices = [dict(available[d]) for d in wanted]
    host = host_facts(env)
    entries = select_probes(suite, tuple(config.get("probe_filter") or ()))
    cases = plan(suite, entries, devices, config.get("backend", "torch"), host, config.get("cpu_ranks"))
    nominals = device_nominal_table(devices, env, suite.nominal)
    # Same boot: CLOCK_MONOTONIC continues, so sample timestamps stay on one timeline.
    sessions = manifest.get("sessions") or []
    boot = _boot_id()
    if sessions and sessions[0].get("boot_id") == boot and sessions[0].get("t0_monotonic_ns"):
        t0_ns = sessions[0]["t0_monotonic_ns"]
    else:
        t0_ns = time.monotonic_ns()
    sessions.append({"started_at": store.utc_now(), "t0_monotonic_ns": t0_ns, "boot_id": boot, "resumed": True})
    run_store.update_manifest(sessions=sessions)
    override = timeout_s if timeout_s is not None else config.get("timeout_override_s")
    return _execute(cases, run_store, devices, nominals, host, suite, override, quiet, t0_ns)


def _execute(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns) -> RunOutcome:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet:
        outcome = execute(cases, run_store, devices, nominals, host, suite.plugins, timeout_s, None, t0_ns,
                          suite.group_timeout_s)
    else:
        console.print(f"run [bold]{run_store.path.name}[/] → {run_store.path}")
        with Progress(
            TextColumn("[progress.description]{task.description}", table_column=None),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            outcome = execute(cases, run_store, devices, nominals, host, suite.plugins, timeout_s, progress, t0_ns,
                              suite.group_timeout_s)
    run_store.finalize("complete")
    if quiet:
        print(run_store.path)
    else:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(outcome.counts.items()))
        console.print(f"done: {counts} — coherence show {run_store.path}")
        sys.stderr.flush()
    return outcome
