"""`coherence run`: from command-line options to a finished run folder."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from harness import atomic, backends, environment, interrupts, registry, store
from harness.config import check_rounds, load_suite, read_yaml, suite_path
from harness.distributed import launcher_env, run_under_launcher
from harness.errors import UserError
from harness.finish import collect_into, report_into
from harness.plan import device_types, host_facts, plan, resolve_devices, select_probes
from harness.runner import (
    RunOutcome,
    device_nominal_table,
    execute,
    new_round_seeds,
    start_run,
    suite_from_manifest,
)

DEFAULT_SUITE = "quick"


def no_case_reason(suite, entries: list, chosen: list[str], devices: list[dict]) -> str:
    """Why a plan is empty, in one line: for each chosen backend, the suite's probes it
    has no kernel for (a plugin backend may measure only a few), else the devices."""
    lacking = []
    for name in chosen:
        missing = [e.name for e in entries if not device_types(registry.get(e.name), name)]
        if len(missing) == len(entries):
            have = sorted(p for p, cls in registry.discover().items() if device_types(cls, name))
            lacking.append(f"backend {name} has no kernel for {', '.join(missing)} "
                           f"(it measures: {', '.join(have) or 'nothing'})")
    ids = ", ".join(d["id"] for d in devices)
    return f"suite '{suite.name}' has no case for devices {ids}" + (f": {'; '.join(lacking)}" if lacking else "")


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


class _RunGuard:
    """What ``coherence run`` holds while it runs: the signal gate (SIGINT/SIGTERM ->
    :class:`harness.interrupts.RunInterrupted`) and the run folder's lock
    (:mod:`harness.runlock`). Used as ``with guard:`` around the whole command; an
    interruption is swallowed there and turned into :meth:`outcome` (one line on
    stderr, exit 130/143), and both are released however the command ends."""

    def __init__(self):
        self.path: Path | None = None
        self.lock = None
        self.interrupted = None

    def take(self, path: Path, command: str) -> None:
        """Lock ``path`` for this command (UserError, exit 2, if another holds it)."""
        from harness.runlock import lock_run

        self.path = Path(path)
        self.lock = lock_run(path, command)

    def __enter__(self) -> "_RunGuard":
        interrupts.install()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        interrupts.uninstall()
        if self.lock is not None:
            self.lock.release()
        if isinstance(exc, interrupts.RunInterrupted):
            self.interrupted = exc
            return True
        return False

    def outcome(self, out: Path) -> RunOutcome:
        """Say in one line what the interruption left, and the outcome to exit with."""
        exc = self.interrupted
        if self.path is None:
            message = f"interrupted by {exc.name} before the run started; nothing written"
        else:
            try:
                status = store.read_manifest(self.path).get("status")
            except UserError:
                status = None
            name = self.path.name
            if status == "complete":
                message = (f"interrupted by {exc.name} after run {name} completed; indicators or report may be "
                           f"missing: coherence collect {self.path} && coherence report {self.path}")
            else:
                message = (f"interrupted by {exc.name}; run {name} is partial: "
                           f"coherence run --resume {name} --out {self.path.parent} completes it")
        print(f"coherence: {message}", file=sys.stderr, flush=True)
        return RunOutcome(path=self.path or out, interrupted=exc.signum)


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
    replays. Bad options raise UserError; so does a run folder another process holds
    (harness.runlock). SIGINT/SIGTERM stop the run: the case in flight is recorded
    ``interrupted``, the run stays partial, and the outcome's exit code is 130/143."""
    guard = _RunGuard()
    with guard:
        return _run_suite(guard, suite_ref, devices_spec, probe_names, backend, out, label, resume, timeout_s,
                          anonymize, quiet, cpu_ranks, report, rounds)
    return guard.outcome(out)


def _run_suite(guard: _RunGuard, suite_ref, devices_spec, probe_names, backend, out: Path, label, resume, timeout_s,
               anonymize, quiet, cpu_ranks, report, rounds) -> RunOutcome:
    if rounds is not None:
        check_rounds(rounds, "--rounds")
    if resume:
        given = [name for name, v in (("--suite", suite_ref), ("--devices", devices_spec), ("--probe", probe_names),
                                      ("--label", label), ("--cpu-ranks", cpu_ranks), ("--rounds", rounds)) if v]
        if given:
            raise UserError(f"--resume replays the run's own configuration; drop {', '.join(given)}")
        return _resume(guard, resume, out, timeout_s, quiet, report)

    # An unusable --out (a file, /dev/null, under a file, read-only, /proc, full) is one
    # line before any case runs, not a traceback after the first one.
    atomic.check_output_dir(out, "--out")
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
                                     report=report, take_lock=guard.take)
        return outcome or RunOutcome(path=out)
    chosen = backends.parse(backend)
    backend = ",".join(chosen)
    # Before anything starts JAX (environment.collect does): force host devices.
    jax_record = environment.prepare_jax_host_devices() if "jax" in chosen else None
    env = environment.collect(anonymize=anonymize)
    devices = resolve_devices(devices_spec, backends.devices_of(chosen, env))
    host = host_facts(env)
    cases = plan(suite, entries, devices, backend, host, cpu_ranks)
    if not cases:
        raise UserError(no_case_reason(suite, entries, chosen, devices))
    out.mkdir(parents=True, exist_ok=True)
    t0_ns = time.monotonic_ns()
    with interrupts.deferred():  # a run folder is created whole or not at all
        run_store, nominals = start_run(suite, suite_doc, out, devices, probe_names, backend, label, timeout_s, env)
        guard.take(run_store.path, "coherence run")
    manifest = run_store.manifest()
    manifest["config"]["cpu_ranks"] = cpu_ranks or suite.cpu_ranks
    manifest["config"]["rounds"] = n_rounds
    seeds = new_round_seeds(n_rounds)
    with interrupts.deferred():
        run_store.update_manifest(
            config=manifest["config"],
            sessions=[{"started_at": store.utc_now(), "t0_monotonic_ns": t0_ns, "boot_id": _boot_id(),
                       "pid": os.getpid()}],
            planned_cases=len(cases),
            rounds=n_rounds,
            round_seeds=seeds,
        )
        if jax_record is not None:
            run_store.update_manifest(jax=jax_manifest(jax_record, devices))
    return _execute(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report, n_rounds, seeds)


def _resume(guard: _RunGuard, ref: str, out: Path, timeout_s: float | None, quiet: bool,
            report: bool = True) -> RunOutcome:
    path = store.resolve_run(ref, out)
    store.check_resumable(path)  # one line for a manifest without environment/config
    atomic.check_output_dir(path, "--resume")  # a read-only or full run folder: one line now
    # Locked before reopen, which already writes (cuts a torn journal line, drops orphan parts).
    guard.take(path, "coherence run --resume")
    with interrupts.deferred():
        run_store = store.RunStore.reopen(path)
    manifest = run_store.manifest()
    suite = suite_from_manifest(manifest)
    config = manifest["config"]
    env = manifest["environment"]
    registry.discover(suite.plugins)
    wanted = config.get("devices") or []
    chosen = backends.parse(config.get("backend", "torch"))
    if "jax" in chosen:
        environment.prepare_jax_host_devices()
    available = {d["id"]: d for d in backends.devices_of(chosen, env)}
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
    with interrupts.deferred():
        run_store.update_manifest(sessions=sessions)
    override = timeout_s if timeout_s is not None else config.get("timeout_override_s")
    # A run made before rounds existed: one round (its journal lines count as round 0).
    n_rounds = int(manifest.get("rounds") or 1)
    seeds = list(manifest.get("round_seeds") or [])
    if len(seeds) < n_rounds or "rounds" not in manifest:
        seeds += new_round_seeds(n_rounds - len(seeds))
        with interrupts.deferred():
            run_store.update_manifest(rounds=n_rounds, round_seeds=seeds)
    return _execute(cases, run_store, devices, nominals, host, suite, override, quiet, t0_ns, report, n_rounds, seeds)


def _execute(cases, run_store, devices, nominals, host, suite, timeout_s, quiet, t0_ns, report: bool = True,
             rounds: int = 1, seeds: list[int] | None = None) -> RunOutcome:
    """Run the cases, then finalize, collect and report. SIGINT/SIGTERM (the gate of
    :class:`_RunGuard`) may stop it anywhere but inside a commit or the finalize merge
    (:func:`harness.interrupts.deferred`)."""
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
    with interrupts.deferred():
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
