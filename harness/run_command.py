"""`coherence run`: from command-line options to a finished run folder."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from harness import environment, registry, store
from harness.config import check_rounds, load_suite, read_yaml, suite_path
from harness.distributed import launcher_env, run_under_launcher
from harness.errors import UserError
from harness.runner import (
    RunOutcome,
    device_nominal_table,
    execute,
    host_facts,
    new_round_seeds,
    plan,
    resolve_devices,
    select_probes,
    start_run,
    suite_from_manifest,
)

DEFAULT_SUITE = "quick"
BACKENDS = ("torch", "jax")


def parse_backends(spec: str | None) -> list[str]:
    """``--backend``: ``torch``, ``jax`` or a comma list (``torch,jax``)."""
    names = [b.strip() for b in (spec or "torch").split(",") if b.strip()]
    if not names:
        raise UserError("--backend: empty")
    for name in names:
        if name not in BACKENDS:
            raise UserError(f"--backend: unknown backend '{name}' (known: {', '.join(BACKENDS)})")
    return list(dict.fromkeys(names))


def backend_devices(backends: list[str], env: dict | None = None) -> list[dict]:
    """The devices of the chosen backends; a backend that is not usable here is an
    error naming it (JAX not installed, say)."""
    available: list[dict] = []
    if "torch" in backends:
        available += environment.torch_devices()
    if "jax" in backends:
        jax_devs = environment.jax_devices()
        if not jax_devs:
            why = ((env or {}).get("frameworks") or {}).get("jax", {}).get("reason") or "no JAX device found"
            raise UserError(f"--backend jax: JAX is not usable here ({why}); install it with pip install 'coherence[jax]'")
        available += jax_devs
    return available


def jax_manifest(record: dict, devices: list[dict]) -> dict:
    """The manifest's ``jax`` section: how many host devices were forced, and the JAX
    devices the run used."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        jax_version = version("jax")
    except PackageNotFoundError:
        jax_version = None
    return {
        **record,
        "version": jax_version,
        "devices": [d["id"] for d in devices if d.get("backend") == "jax"],
        "cpu_devices_seen": sum(1 for d in environment.jax_devices() if d["type"] == "cpu"),
        "multi_host": {k: os.environ.get(k) for k in ("COHERENCE_JAX_COORDINATOR", "COHERENCE_JAX_NUM_PROCESSES",
                                                       "COHERENCE_JAX_PROCESS_ID") if os.environ.get(k)} or None,
    }


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
    report: bool = True,
    rounds: int | None = None,
) -> RunOutcome:
    """``coherence run``. ``rounds`` (--rounds) overrides the suite's ``rounds``; the
    manifest records ``rounds`` and ``round_seeds`` (one per round), which --resume
    replays. Bad options raise UserError."""
    if rounds is not None:
        check_rounds(rounds, "--rounds")
    if resume:
        given = [name for name, v in (("--suite", suite_ref), ("--devices", devices_spec), ("--probe", probe_names),
                                      ("--label", label), ("--cpu-ranks", cpu_ranks), ("--rounds", rounds)) if v]
        if given:
            raise UserError(f"--resume replays the run's own configuration; drop {', '.join(given)}")
        return _resume(resume, out, timeout_s, quiet, report)

    ref = suite_ref or DEFAULT_SUITE
    suite = load_suite(ref)
    suite_doc = read_yaml(suite_path(ref))
    entries = select_probes(suite, probe_names)
    n_rounds = rounds or suite.rounds
    launch = launcher_env()
    if launch and rounds is not None and rounds > 1:
        # The launcher path runs its multi-rank cases once, in plan order.
        raise UserError(f"--rounds {rounds}: rounds are not supported under torchrun; give --rounds 1")
    if launch and n_rounds > 1 and not quiet:
        print(f"note: suite '{suite.name}' asks for {n_rounds} rounds; under torchrun the run is one round",
              file=sys.stderr)
    if launch:
        outcome = run_under_launcher(launch, suite, suite_doc, probe_names, devices_spec, out, label, timeout_s, anonymize, quiet,
                                     report=report)
        return outcome or RunOutcome(path=out)
    backends = parse_backends(backend)
    backend = ",".join(backends)
    # Before anything starts JAX (environment.collect does): force host devices.
    jax_record = environment.prepare_jax_host_devices() if "jax" in backends else None
    env = environment.collect(anonymize=anonymize)
    devices = resolve_devices(devices_spec, backend_devices(backends, env))
    host = host_facts(env)
    cases = plan(suite, entries, devices, backend, host, cpu_ranks)
    if not cases:
        raise UserError(f"suite '{suite.name}' has no case for devices {', '.join(d['id'] for d in devices)}")
    out.mkdir(parents=True, exist_ok=True)
    t0_ns = time.monotonic_ns()
    run_store, nominals = start_run(suite, suite_doc, out, devices, probe_names, backend, label, timeout_s, env)
    manifest = run_store.manifest()
    manifest["config"]["cpu_ranks"] = cpu_ranks or suite.cpu_ranks
    manifest["config"]["rounds"] = n_rounds
    seeds = new_round_seeds(n_rounds)
    run_store.update_manifest(
        config=manifest["config"],
        sessions=[{"started_at": store.utc_now(), "t0_monotonic_ns": t0_ns, "boot_id": _boot_id()}],
        planned_cases=len(cases),
        rounds=n_rounds,
        round_seeds=seeds,
    )
    if jax_record is not None:
        run_store.update_manifest(jax=jax_manifest(jax_record, devices))
    return _execute(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report, n_rounds, seeds)


def _resume(ref: str, out: Path, timeout_s: float | None, quiet: bool, report: bool = True) -> RunOutcome:
    path = store.resolve_run(ref, out)
    store.check_resumable(path)  # one line for a manifest without environment/config
    run_store = store.RunStore.reopen(path)
    manifest = run_store.manifest()
    suite = suite_from_manifest(manifest)
    config = manifest["config"]
    env = manifest["environment"]
    registry.discover(suite.plugins)
    wanted = config.get("devices") or []
    backends = parse_backends(config.get("backend", "torch"))
    if "jax" in backends:
        environment.prepare_jax_host_devices()
    available = {d["id"]: d for d in backend_devices(backends, env)}
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
    sessions.append({"started_at": store.utc_now(), "t0_monotonic_ns": t0_ns, "boot_id": boot, "resumed": True,
                     # Damaged journal lines or parts that reopen repaired (their rounds run again).
                     **({"damaged": run_store.damage} if run_store.damage else {})})
    run_store.update_manifest(sessions=sessions)
    override = timeout_s if timeout_s is not None else config.get("timeout_override_s")
    # A run made before rounds existed: one round (its journal lines count as round 0).
    n_rounds = int(manifest.get("rounds") or 1)
    seeds = list(manifest.get("round_seeds") or [])
    if len(seeds) < n_rounds or "rounds" not in manifest:
        seeds += new_round_seeds(n_rounds - len(seeds))
        run_store.update_manifest(rounds=n_rounds, round_seeds=seeds)
    return _execute(cases, run_store, devices, nominals, host, suite, override, quiet, t0_ns, report, n_rounds, seeds)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (``timeout``, a job scheduler) as SystemExit, so the runner's cleanup
    kills the worker and its ranks instead of leaving them orphaned and running."""
    raise SystemExit(128 + signum)


def _execute(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report: bool = True,
             rounds: int = 1, seeds: list[int] | None = None) -> RunOutcome:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return _execute_inner(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report,
                                  rounds, seeds)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return _execute_inner(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report, rounds,
                          seeds)


def _execute_inner(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report: bool = True,
                   rounds: int = 1, seeds: list[int] | None = None) -> RunOutcome:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if quiet:
        outcome = execute(cases, run_store, devices, nominals, host, suite.plugins, timeout_s, None, t0_ns,
                          suite.group_timeout_s, rounds, seeds)
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
                              suite.group_timeout_s, rounds, seeds)
    run_store.finalize("complete")
    collect_into(run_store.path, console if not quiet else None)
    if report:
        report_into(run_store.path, console if not quiet else None)
    if quiet:
        print(run_store.path)
    else:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(outcome.counts.items()))
        console.print(f"done: {counts} — coherence show {run_store.path}")
        sys.stderr.flush()
    return outcome


def collect_into(path: Path, console=None) -> Path | None:
    """Write indicators.json into a finished run folder. A collector failure is reported
    and leaves the run (already complete on disk) as it is: results are never lost to
    an analysis bug."""
    from rich.console import Console

    from harness.collector import write_indicators

    try:
        target = write_indicators(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the run is on disk; say what failed
        message = f"indicators not written: {type(exc).__name__}: {exc}"
        (Console(stderr=True) if console is None else console).print(f"[yellow]{message}[/]")
        return None
    if console is not None:
        console.print(f"indicators → {target}")
    return target


def report_into(path: Path, console=None) -> Path | None:
    """Write report.html into a finished run folder (after its indicators). A report
    failure is reported as a warning and leaves the run as it is, like
    :func:`collect_into`: results are never lost to a rendering bug."""
    from rich.console import Console
    from rich.markup import escape

    from harness.report import write_run_report

    try:
        target = write_run_report(path)
    except Exception as exc:  # noqa: BLE001 - the run is on disk; say what failed
        message = f"report not written: {type(exc).__name__}: {exc} (retry with: coherence report {path})"
        (Console(stderr=True) if console is None else console).print(f"[yellow]{escape(message)}[/]", highlight=False)
        return None
    if console is not None:
        console.print(f"report → {target}")
    return target
