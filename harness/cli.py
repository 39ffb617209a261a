"""The `coherence` command line.

Heavy modules (torch, pandas, pynvml, the probes) are imported inside the commands,
never at module level, so `coherence --help` stays fast and `coherence env` works
where a framework is missing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from harness.config import MAX_CPU_RANKS, MAX_TIMEOUT_S
from harness.headline import DEFAULT_FAIL_ON, FAIL_ON
from harness.errors import UserError

DEFAULT_OUT = Path("results")

# Commands that read runs name the folder holding them --results; --out names an output
# folder (run, validate). --out is kept on the reading commands as a deprecated alias.
RESULTS_HELP = "Folder holding runs, for run ids (default results/; --out DIR is a deprecated alias)."


def results_option(func):
    """``--results DIR`` (input: where run ids are looked up) and the hidden, deprecated
    ``--out DIR`` that meant the same on the commands that read runs."""
    func = click.option("--out", "legacy_out", type=click.Path(path_type=Path), default=None, hidden=True,
                        help="Deprecated alias of --results.")(func)
    return click.option("--results", "results_dir", type=click.Path(path_type=Path), default=None,
                        metavar="DIR", help=RESULTS_HELP)(func)


def runs_folder(results: Path | None, legacy_out: Path | None, hint: str = "") -> Path:
    """The folder run ids are looked up in: ``--results``, else the deprecated ``--out``
    (one warning line on stderr), else results/. A folder given explicitly must exist:
    UserError naming it (with ``hint``), never a value that is quietly not used."""
    chosen, name = results, "--results"
    if legacy_out is not None:
        if results is not None and Path(results) != Path(legacy_out):
            raise UserError(f"--results {results} and --out {legacy_out}: two folders holding runs; give --results only")
        chosen, name = legacy_out, "--out"
    if chosen is None:
        return DEFAULT_OUT
    if not Path(chosen).is_dir():  # checked before the warning: bad input stays one line
        raise UserError(f"{name} {chosen}: no such folder of runs{hint}")
    if legacy_out is not None:
        click.echo("coherence: warning: --out DIR for the folder holding runs is deprecated here; use --results DIR "
                   "(--out names an output folder)", err=True)
    return Path(chosen)


def _one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


class OneLineUsageError(click.UsageError):
    """A click usage error (no such option or command, a bad or missing value) shown
    as ONE line on stderr, with the help hint in it, exit code 2:

        coherence: error: No such option: --bogus (see 'coherence run --help')

    click's own ``UsageError.show`` prints the usage, a "Try ..." line and the error:
    4-5 lines, where every other error of ours is one."""

    def __init__(self, original: click.ClickException, ctx: click.Context | None = None):
        super().__init__(original.format_message(), ctx=getattr(original, "ctx", None) or ctx)
        self.exit_code = 2

    def show(self, file=None) -> None:
        path = self.ctx.command_path if self.ctx is not None else "coherence"
        click.echo(f"coherence: error: {_one_line(self.format_message())} (see '{path} --help')", file=file,
                   err=file is None)


def _as_one_line(exc: click.ClickException, ctx: click.Context | None) -> click.ClickException:
    # NoArgsIsHelpError (a bare `coherence`) is click's way of printing the help: kept.
    if isinstance(exc, (OneLineUsageError, click.exceptions.NoArgsIsHelpError)):
        return exc
    # FileError and other ClickExceptions are bad input too: one line, exit code 2.
    return OneLineUsageError(exc, ctx)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses NaN and ±inf: NaN compares false with every
    bound, so FloatRange alone lets ``--alpha nan`` through."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def not_empty(option: str, value: str | None) -> None:
    """Refuse a comma-list option given as '' or ',' (click.BadParameter, one line)."""
    if value is not None and not any(t.strip() for t in value.split(",")):
        raise click.BadParameter(f"empty value {value!r}; leave the option out for the default",
                                 param_hint=f"'{option}'")


class CoherenceGroup(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit code 2, and
    every click usage error (parsing the group's or a command's arguments, converting
    an option's value, a command raising click.BadParameter) into a OneLineUsageError:
    one line naming the culprit, with ``see 'coherence CMD --help'`` in it, exit 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        # The group's own options and the command name: `coherence --bogus`.
        # Named `coherence` however it was started (the console script, python -m
        # harness.cli, a test's CliRunner), so the help hint is a command that works.
        try:
            return super().make_context("coherence" if parent is None else info_name, args, parent=parent, **extra)
        except click.ClickException as exc:
            raise _as_one_line(exc, None) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"coherence: error: {_one_line(exc)}", err=True)
            ctx.exit(2)
        except click.ClickException as exc:
            # A command's arguments (click parses them inside Group.invoke) or its body.
            raise _as_one_line(exc, ctx) from None
        except KeyboardInterrupt:
            # Ctrl-C in any command (`run` has its own handling, harness.interrupts): the
            # shell's code for death by SIGINT, 128 + 2 (Bash manual, "Exit Status"), not
            # click's 1, which here means "a case failed".
            click.echo("coherence: interrupted (SIGINT)", err=True)
            ctx.exit(130)


@click.group(name="coherence", cls=CoherenceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coherence")
def main() -> None:
    """Benchmark harness for heterogeneous AI inference.

    Runs real probes (memory, GEMM, prefill/decode, transfers, collectives,
    overhead, composite serving steps) on the devices this node has, in rounds,
    keeps every sample, and writes a versioned run folder
    results/<run_id>/ (manifest.json, cases.parquet, samples.parquet,
    telemetry.parquet, indicators.json, report.html).

    \b
    Typical use:
      coherence env                      # what this node is, layer by layer, and its nominal peaks
      coherence env --capture DIR        # snapshot it; env --sysroot DIR replays a snapshot
      coherence list                     # probes, grids, devices they would run on
      coherence run --suite quick        # run a suite, write results/<run_id>/
      coherence show <run_id>            # its verdict, then one table per family
      coherence report <run_id>          # its HTML report (run writes report.html too)

    Exit codes: 0 all cases ok (or skipped), 1 some case failed or timed out
    (run, show, collect: also an indicator's fail with --fail-on fail, or a warn
    with --fail-on warn), 2 bad input (config, arguments, result files),
    130 interrupted by SIGINT, 143 by SIGTERM.
    """


def listed_devices() -> list[dict]:
    """The devices `coherence list` places probes on: torch's, and those of any backend a
    plugin added (JAX's are left out: listing them starts JAX; `run --backend jax` plans
    them). A plugin backend whose device listing fails is passed over here; `run` says
    why."""
    from harness import backends, environment

    found = list(environment.torch_devices())
    for name in backends.known():
        if name in ("torch", "jax"):
            continue
        try:
            found += backends.devices_of([name])
        except UserError:
            continue
    return found


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
@click.option("--anonymize", is_flag=True, help="Replace host names, serials and UUIDs by stable pseudonyms (also in a --capture).")
@click.option("--sysroot", "sysroot", default=None, metavar="DIR",
              help="Fingerprint a captured machine: read /proc, /sys, /etc, /dev/cpu under DIR; run nothing, measure nothing.")
@click.option("--capture", "capture_dir", default=None, metavar="DIR",
              help="Write a snapshot of this node (only the files the fingerprint reads, < 1 MiB) into DIR (new or empty).")
def env(as_json: bool, anonymize: bool, sysroot: str | None, capture_dir: str | None) -> None:
    """Environment fingerprint: host, CPU, memory, OS, frameworks, devices per
    backend, NVIDIA GPUs (NVML), every virtualization layer, and each device's nominal
    peaks with the datasheet row or CPU rule they come from, each fact with how it was
    detected.

    \b
    coherence env --capture DIR [--anonymize]   snapshot this node into DIR
    coherence env --sysroot DIR [--json]        fingerprint a snapshot (no live probing)"""
    from harness import environment

    if sysroot and capture_dir:
        raise UserError("--sysroot and --capture: choose one (capture this node, or read a captured one)")
    if capture_dir:
        from harness.capture import capture

        res = capture(capture_dir, anonymize=anonymize)
        virt = res["doc"]["virtualization"]["summary"]
        click.echo(f"captured {res['files']} files, {res['dirs']} directories, {res['bytes']} bytes "
                   f"into {capture_dir} (virtualization: {virt}); read it with: coherence env --sysroot {capture_dir}")
        return
    if sysroot:
        from harness.capture import check_sysroot

        check_sysroot(sysroot)
        doc = environment.collect(anonymize=anonymize, root=sysroot, env={}, live=False, with_nominal=True)
    else:
        doc = environment.collect(anonymize=anonymize, with_nominal=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    from harness.show import print_environment

    print_environment(doc)


@main.command(name="list")
@click.option("--suite", default=None, help="Show the grids of this suite (name or YAML path) instead of the probes' defaults.")
@click.option("--devices", default=None, help="Limit to these devices (e.g. cpu,cuda:0).")
@click.option("--json", "as_json", is_flag=True, help="Print the probes (name, family, backends, ranks, grid, devices) as JSON.")
def list_probes(suite: str | None, devices: str | None, as_json: bool) -> None:
    """Registered probes: family, parameter grid, work model, and the devices of this
    node they would run on."""
    from harness import config, registry
    from harness.plan import resolve_devices
    from harness.show import devices_here, print_probe_list

    not_empty("--devices", devices)
    entries, plugins = None, []
    if suite:
        loaded = config.load_suite(suite)
        entries, plugins = {e.name: e for e in loaded.probes}, loaded.plugins
    # After the suite: its plugins register probes of their own.
    probes = registry.discover(plugins)
    available = resolve_devices(devices, listed_devices())
    if as_json:
        doc = []
        for name in sorted(probes):
            if entries is not None and name not in entries:
                continue
            cls = probes[name]
            grid = entries[name].grid if entries else {k: list(p.default) for k, p in cls.params.items()}
            doc.append({"probe": name, "family": cls.family, "backends": list(registry.backends_of(cls)), "ranks": cls.ranks,
                        "grid": grid, "devices": devices_here(cls, available)})
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    print_probe_list(probes, entries, available)


def fail_on_option(fn):
    """``--fail-on {case,fail,warn}`` (harness.headline.exit_code): what makes the exit
    code 1, for CI gating the way DCGM diag's Pass/Warn/Fail and MLPerf's VALID/INVALID
    are used. Default ``case``: only a failed or timed-out case, as before the flag."""
    return click.option(
        "--fail-on", "fail_on", type=click.Choice(list(FAIL_ON)), default=DEFAULT_FAIL_ON, show_default=True,
        help="Exit 1 when: a case failed or timed out (case); also an indicator fails (fail); "
             "also an indicator warns (warn).")(fn)


@main.command()
@click.option("--suite", "suite_ref", default=None, help="Suite name (configs/<name>.yaml) or path to a suite YAML. Default: quick.")
@click.option("--devices", default=None, help="Comma list: cpu, cuda, cuda:0, mps, all (default: all devices of this node).")
@click.option("--probe", "probes", multiple=True, help="Only this probe or family (repeatable; comma lists allowed).")
@click.option("--backend", default="torch", show_default=True, help="Framework the probes run on: torch, jax, a plugin's backend, or a comma list (torch,jax: side by side, JAX devices named jax:cpu:0, jax:gpu:0, jax:tpu:0).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True, help="Folder that receives results/<run_id>/.")
@click.option("--label", default="", help="Free text stored in the manifest (e.g. 'before migration').")
@click.option("--resume", "resume", default=None, metavar="RUN_ID", help="Finish an interrupted run (run id under --out, or its folder).")
@click.option("--timeout", "timeout_s", type=FiniteFloat(min=0, max=MAX_TIMEOUT_S, min_open=True), default=None, help="Per-case time limit in seconds (overrides the suite's timeout_s).")
@click.option("--cpu-ranks", type=click.IntRange(min=1, max=MAX_CPU_RANKS), default=None, help="CPU ranks (Gloo) for multi-rank probes (overrides the suite's cpu_ranks, default 2).")
@click.option("--anonymize", is_flag=True, help="Anonymize host names and serials in the manifest.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the run folder.")
@click.option("--no-report", "no_report", is_flag=True, help="Do not write report.html into the run folder at the end (coherence report RUN writes it later).")
@click.option("--rounds", "rounds", type=int, default=None, help="Run the suite as N rounds, each in a freshly shuffled case order and a fresh worker, the time budget split across them (overrides the suite's rounds).")
@fail_on_option
def run(suite_ref, devices, probes, backend, out, label, resume, timeout_s, cpu_ranks, anonymize, quiet, no_report,
        rounds=None, fail_on="case") -> None:
    """Run a suite and write results/<run_id>/.

    Every case runs in an isolated worker process under a time limit; a probe that
    raises, crashes its worker or overruns is recorded with its status and reason and
    the run goes on. Cases are written as they finish (manifest status 'partial'
    until the end), so a killed run keeps its finished cases and --resume completes it
    (including the rounds it had not finished).

    Ctrl-C (SIGINT) or SIGTERM stops the run at once: the case in flight is recorded
    'interrupted', workers and ranks are killed, and the exit code is 130 or 143;
    --resume re-runs that case. Workers die with this process even if it is killed.
    One writer per run folder (run, --resume, collect): a second one gets exit 2
    naming the pid that holds it.
    """
    from harness.run_command import run_suite

    probe_names = tuple(p.strip() for item in probes for p in item.split(",") if p.strip())
    # An empty value would fall back to the default (all devices, torch, every probe).
    not_empty("--devices", devices)
    not_empty("--backend", backend)
    if probes and not probe_names:
        raise click.BadParameter("empty; name a probe or a family", param_hint="'--probe'")
    outcome = run_suite(
        suite_ref=suite_ref,
        devices_spec=devices,
        probe_names=probe_names,
        backend=backend,
        out=out,
        label=label,
        resume=resume,
        timeout_s=timeout_s,
        anonymize=anonymize,
        quiet=quiet,
        cpu_ranks=cpu_ranks,
        report=not no_report,
        rounds=rounds,
    )
    code = outcome.exit_code
    if outcome.interrupted:
        # SIGINT/SIGTERM: the run is synced, its worker and ranks are dead, the lock is
        # released. Leave now instead of spending seconds in the interpreter's teardown
        # of torch/JAX (measured 2-4 s on a loaded 2-core VM), so nothing of ours
        # outlives the signal by more than moments (the resource tracker exits on EOF).
        sys.stdout.flush()
        sys.stderr.flush()
        import os

        os._exit(code)
    # Not for an interrupted run (its own exit code stands), nor for a torchrun rank
    # other than 0: global rank 0 wrote the run folder and gives its headline.
    if code in (0, 1) and (outcome.path / "manifest.json").exists():
        from harness.headline import exit_code, verdict_summary

        summary = verdict_summary(outcome.path)
        if not quiet:
            from harness.show import print_headline

            print_headline(summary)
        code = max(code, exit_code(summary, fail_on))
    sys.exit(code)


@main.command()
@click.argument("run_ref", metavar="RUN")
@results_option
@click.option("--json", "as_json", is_flag=True, help="Print the cases as JSON records.")
@fail_on_option
def show(run_ref: str, results_dir: Path | None, legacy_out: Path | None, as_json: bool, fail_on: str = "case") -> None:
    """Print a run's verdict (PASS / WARN / FAIL, counts, largest findings), then one
    table per probe family, the serving summary and the indicators that need attention,
    fitted to the terminal (COLUMNS; 80 when piped). RUN is a run id or a run folder."""
    from harness import store
    from harness.show import print_run

    path = store.resolve_run(run_ref, runs_folder(results_dir, legacy_out))
    manifest = store.read_manifest(path)
    cases = store.read_cases(path)
    indicators_path = path / "indicators.json"
    from harness.headline import exit_code, summarize
    from harness.results import read_indicators

    indicators = read_indicators(path) if indicators_path.exists() else None
    summary = summarize(cases.to_dict(orient="records") if len(cases) else [], indicators, manifest)
    if as_json:
        click.echo(cases.to_json(orient="records", indent=2))
    else:
        print_run(manifest, cases, indicators, summary)
    sys.exit(exit_code(summary, fail_on))


@main.command()
@click.argument("run_ref", metavar="RUN")
@results_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the path of indicators.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the indicators.json document instead of the tables.")
@fail_on_option
def collect(run_ref: str, results_dir: Path | None, legacy_out: Path | None, quiet: bool, as_json: bool,
            fail_on: str = "case") -> None:
    """(Re)compute a run's indicators.json: capacity ladder, serving capacity (κ, C_eff,
    C_nom, ε, waterfall) and the mode 1–4 indicators of INDICATORS.md, with thresholds
    from configs/indicators.yaml and the suite's `indicators:` overrides. `coherence run`
    does this at the end of every run."""
    from harness import store
    from harness.collector import write_indicators
    from harness.results import read_indicators

    if quiet and as_json:
        raise UserError("collect: --quiet and --json: choose one")
    path = store.resolve_run(run_ref, runs_folder(results_dir, legacy_out))
    from harness.runlock import RunLock

    # A writer of the run folder: not while a run or resume holds it (harness.runlock).
    with RunLock(path, "coherence collect"):
        target = write_indicators(path)
    from harness.headline import exit_code, verdict_summary

    summary = verdict_summary(path)
    if quiet:
        click.echo(str(target))
    elif as_json:
        click.echo(json.dumps(read_indicators(path), indent=1, ensure_ascii=False))
    else:
        from harness.show import print_headline, print_indicators

        print_headline(summary)
        print_indicators(read_indicators(path))
        click.echo(f"indicators → {target}")
    sys.exit(exit_code(summary, fail_on))


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="BASELINE... CANDIDATE")
@results_option
@click.option("--gate", default=None, help="Gated metrics and their limits, e.g. 'p50:+5%,p99:+10%,sla:2x' (default from configs/compare.yaml).")
@click.option("--alpha", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None, help="Family-wise significance level, Holm-corrected across cases (default 0.05).")
@click.option("--min-floor", "min_floor", type=FiniteFloat(0, 1, max_open=True), default=None, help="Minimum noise floor as a fraction, e.g. 0.02 = a shift must exceed 2% (default from configs/compare.yaml).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Compare/fleet settings YAML (default configs/compare.yaml).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print the comparison as Markdown (for a PR or a ticket).")
@click.option("--all", "show_all", is_flag=True, help="Show every case with every statistic, every indicator delta and the one-sided cases (default: only what changed).")
def compare(runs, results_dir, legacy_out, gate, alpha, min_floor, config_path, as_json, as_markdown,
            show_all) -> None:
    """Compare run CANDIDATE (the last argument) against BASELINE, case by case (mode 5).

    BASELINE is one run, or several repeats of it (run ids, run folders, or a directory
    whose run folders are all taken): `compare A B`, `compare A1 A2 A3 B`,
    `compare baselines/ B`. Repeats give each case its run-to-run noise floor.

    Per case in both: p50 ratio with a bootstrap 95% CI, Mann-Whitney U p-value
    (Holm-corrected across cases), Kolmogorov-Smirnov statistic, p99 ratio, SLA
    amplification (violations of the case's SLO, else of the baseline's p99); then the
    mode 1-4 indicators (indicators.json) and the environment fingerprint diff (against
    the first baseline run); on different device classes, efficiency and performance
    per watt side by side. Repeated baselines are pooled for the statistics.

    \b
    Noise floor per case (shown with its source), the largest of:
      repeats    3 x sqrt(1+1/k) x sd of log p50 over the k baseline runs (p99 alike)
      one run    3 x sqrt(2) x the drift between consecutive blocks of its samples
                 (what within-block sampling does not explain)
      family     the same estimate's median over the case's probe family
      minimum    compare.noise_floor.min (2%), or --min-floor

    \b
    Verdict per case (gate 'p50:+5%,p99:+10%,sla:2x'):
      regressed  a gated metric is worse than its gate, significantly, and beyond the
                 noise floor (p50: Holm p < alpha, CI low > gate, ratio > floor;
                 p99: CI low > gate, ratio > floor; sla: amplification of violations of
                 the threshold raised by the floor > gate, Holm-corrected Fisher p < alpha)
      improved   better than 1/gate under the same rule, nothing regressed
      unchanged  otherwise; "within noise floor" when the statistics alone would have
                 called it (counted in the summary line)

    \b
    Output: the changed cases (regressed, then improved) with their figures and
    reasons, cases ok in the baseline but not in the candidate, the indicators
    that moved beyond their noise (compare.indicators.min_change), the changed
    environment facts, then the geometric mean of the p50 ratios (as pyperf
    compare_to) and one line of counts (unchanged, only in one run, held by the
    floor). --all shows every case and delta; --json is the complete document.
    The text fits the terminal (COLUMNS; 80 when piped).

    Exit codes: 0 no gated case regressed, 1 some gated case regressed, 2 bad input.
    """
    from harness.compare import (
        add_render_summary,
        compare_runs,
        load_config,
        markdown,
        parse_gate,
        print_comparison,
        to_jsonable,
    )
    from harness.results import load_path, run_folders

    if as_json and as_markdown:
        raise UserError("--json and --markdown: choose one")
    if as_json and show_all:
        raise UserError("--json and --all: --json is always complete; drop --all")
    out = runs_folder(results_dir, legacy_out)
    if len(runs) < 2:
        raise UserError("compare needs a BASELINE and a CANDIDATE run (compare BASELINE... CANDIDATE)")
    cfg = load_config(config_path)
    gates = parse_gate(gate) if gate is not None else parse_gate(cfg["compare"]["gate"])
    if alpha is not None:
        cfg["compare"]["alpha"] = alpha
    if min_floor is not None:
        cfg["compare"]["noise_floor"]["min"] = min_floor
    cand_paths = run_folders(runs[-1], out)
    if len(cand_paths) != 1:
        raise UserError(f"{runs[-1]}: the candidate (last argument) must be one run, not a directory of {len(cand_paths)}")
    base_paths: list[Path] = []
    for ref in runs[:-1]:
        for path in run_folders(ref, out):
            if path.resolve() not in {p.resolve() for p in base_paths}:
                base_paths.append(path)
    if cand_paths[0].resolve() in {p.resolve() for p in base_paths}:
        raise UserError(f"{runs[-1]}: the candidate is also a baseline run")
    run_b = load_path(cand_paths[0])
    doc = add_render_summary(compare_runs([load_path(p) for p in base_paths], run_b, gates, cfg), cfg)
    if as_json:
        click.echo(json.dumps(to_jsonable(doc), indent=2, default=str))
    elif as_markdown:
        click.echo(markdown(doc, show_all=show_all), nl=False)
    else:
        print_comparison(doc, show_all=show_all)
    sys.exit(doc["exit_code"])


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="RUN_OR_DIR...")
@results_option
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Compare/fleet settings YAML (default configs/compare.yaml).")
@click.option("--z", "z_threshold", type=FiniteFloat(0, min_open=True), default=None, help="|robust z| threshold for flagging metrics and nodes (default 3.5).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the per-node metric table (values, class median, MAD, z, flag) as CSV.")
@click.option("--parquet", "parquet_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the same table as Parquet.")
@click.option("--json", "as_json", is_flag=True, help="Print the fleet view as JSON.")
def fleet(refs, results_dir, legacy_out, config_path, z_threshold, csv_path, parquet_path, as_json) -> None:
    """Fleet view of many runs (one per node): outliers within each device class.

    RUN_OR_DIR is a run id, a run folder, or a directory whose run folders are all
    taken. Per device class and case, the median time (p50_s) and the best rate of
    each node get a robust z-score (x - median)/max(1.4826 MAD, r median), r the larger
    of 2% (fleet.min_scale_rel in the config) and the node-to-node spread known from
    the other cases (median 1.4826 MAD/median over the case's probe family, or over the
    whole class; fleet.pool_scale), so a six-node class does not flag noise; |z| > 3.5
    flags the metric. A node is flagged when the median |z| of its metrics in a probe family
    (memory, gemm, ...) or a run indicator (epsilon, C_eff, C_nom) exceeds 3.5
    (fleet.node_rule: 'any' flags it on any single metric).
    With indicators.json: epsilon, C_eff, C_nom per node, and sum C_eff against sum
    C_nom (cost per effective token with a price per device-hour in the config).

    Exit codes: 0 (the fleet view is descriptive), 2 bad input.
    """
    from harness.compare import load_config
    from harness.fleet import fleet_view_paths, jsonable, node_paths, print_fleet, write_table

    out = runs_folder(results_dir, legacy_out)
    cfg = load_config(config_path)
    if z_threshold is not None:
        cfg["fleet"]["z_threshold"] = z_threshold
    # Summaries only (manifest, cases, indicators): never every raw sample of a fleet.
    doc = fleet_view_paths(node_paths(refs, out), cfg)
    write_table(doc["long"], csv_path, parquet_path)
    if as_json:
        click.echo(json.dumps(jsonable(doc), indent=2, default=str))
    else:
        print_fleet(doc)


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--format", "fmt", default=None, metavar="csv|parquet|jsonl|prometheus",
              help="Output format (default: from the -o FILE suffix .csv, .parquet, .prom, .jsonl; else jsonl).")
@click.option("--output", "-o", "output", default="-", show_default=True, metavar="FILE|-",
              help="File to write (atomically: a temporary name, then a rename); '-' is stdout. Parquet needs a file.")
@results_option
def export(run_ref: str, fmt: str, output: str, results_dir: Path | None, legacy_out: Path | None) -> None:
    """Export a run's key metrics and indicators as records for other tools.

    \b
    Formats (the same records and metric names in each):
      jsonl       one JSON object per line: {"metric", "value", "unit", "labels",
                  "timestamp"} (PerfKitBenchmarker's sample shape; timestamp = end of
                  the run, Unix seconds)
      prometheus  text format 0.0.4 for node_exporter's textfile collector
                  (-o DIR/coherence.prom); gauges coherence_<name>_<unit>
      csv         one row per record: metric, value, unit, timestamp, one column
                  per label
      parquet     the same table (needs --output)

    Records: run info and case counts per status; every case's status as a state
    set (coherence_case_status{status=ok|failed|timeout|skipped} 1/0, reason label);
    per ok case latency p50/p90/p99/mean/min/max, repetitions, FLOP/s, B/s, algbw and
    busbw, roofline fraction, energy (J per repetition, W, FLOP/J, B/J; and
    coherence_case_energy_info: measured or the reason not); from indicators.json
    the capacity headline (and tokens/J), the capacity ladder (and FLOP/J, B/J
    per device), per composite kappa (graph_applied label)/C_eff/C_nom/epsilon
    and J/token, tokens/J, every mode 1-4
    indicator with a value, verdict counts. Labels: run_id, host, device,
    device_class, case_id, probe, family, backend (cases); mode, indicator, unit,
    verdict (indicators); energy_method, energy_scope (energy). Missing values are
    left out, never NaN.
    """
    from harness import export as exporter
    from harness.results import load_run

    fmt = exporter.infer_format(fmt, output)
    target = exporter.check_output(fmt, output)
    out = runs_folder(results_dir, legacy_out, hint="; write the export to a file with -o/--output FILE")
    data = exporter.render(load_run(run_ref, out), fmt)
    exporter.write(data, target)
    if target is not None:
        click.echo(f"export ({exporter.check_format(fmt)}) → {target}", err=True)


@main.command()
@click.argument("refs", nargs=-1, metavar="RUN | --compare BASELINE... CANDIDATE | --fleet RUN_OR_DIR...")
@click.option("--compare", "compare_mode", is_flag=True, help="Report a comparison: the last run is the candidate, the others its baseline (repeats).")
@click.option("--fleet", "fleet_mode", is_flag=True, help="Report a fleet view of many runs (run ids, run folders, or directories of runs).")
@click.option("--output", "-o", "out_file", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
              help="HTML file to write. Default: RUN/report.html; with --compare compare-<A>-vs-<B>.html, with --fleet fleet-report.html (in --out DIR, else the current folder).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Folder the report goes into under its default name (an existing folder; --out FILE is the deprecated spelling of -o FILE).")
@click.option("--results", "results_dir", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True, metavar="DIR", help="Folder holding runs (for run ids).")
@click.option("--gate", default=None, help="--compare: gated metrics and limits (default from configs/compare.yaml).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="--compare/--fleet: settings YAML (default configs/compare.yaml).")
def report(refs, compare_mode, fleet_mode, out_file, out_dir, results_dir, gate, config_path) -> None:
    """Write a self-contained HTML report (inline SVG plots; no network needed to view it).

    \b
    coherence report RUN                      one run: environment fingerprint and
        virtualization layers, capacity waterfall nominal → effective, roofline per
        device (measured and nominal ceilings), latency CDFs per family, collective
        busbw against size per world size, transfer bandwidth heatmap and KV layouts,
        the mode 1-4 indicators with verdicts and the cases behind each, and every
        failed, timed-out or skipped case with its reason
    coherence report --compare A B            CDF overlays, SLA amplification, verdict
        table, indicator deltas, fingerprint diff (A may be several repeats)
    coherence report --fleet RUN_OR_DIR...    outlier chart, capacity by node and class

    `coherence run` writes RUN/report.html at the end (--no-report skips it). Plots
    need matplotlib (the plot extra); without it the tables are written and the page
    says why the plots are missing. Exit codes: 0 written, 2 bad input.
    """
    from harness import report as reports
    from harness.results import load_path, run_folders

    if compare_mode and fleet_mode:
        raise UserError("report: --compare and --fleet: choose one")
    if gate is not None and not compare_mode:
        raise UserError("report: --gate applies to --compare only")
    if config_path is not None and not (compare_mode or fleet_mode):
        raise UserError("report: --config applies to --compare and --fleet only")
    if out_dir is not None:
        if out_file is not None:
            raise UserError(f"report: --out {out_dir} and -o/--output {out_file}: give one")
        if not out_dir.is_dir():
            # The old meaning: --out FILE. It still works, once more, with a warning.
            click.echo("coherence: warning: report --out FILE is deprecated; use -o/--output FILE "
                       "(--out names an output folder)", err=True)
            out_file, out_dir = out_dir, None
    if not refs:
        raise UserError("report: name a RUN (or --compare BASELINE... CANDIDATE, or --fleet RUN_OR_DIR...)")
    if compare_mode:
        from harness.compare import load_config, parse_gate

        if len(refs) < 2:
            raise UserError("report --compare needs a BASELINE and a CANDIDATE run")
        cfg = load_config(config_path)
        gates = parse_gate(gate) if gate is not None else parse_gate(cfg["compare"]["gate"])
        cand = run_folders(refs[-1], results_dir)
        if len(cand) != 1:
            raise UserError(f"{refs[-1]}: the candidate (last argument) must be one run, not a directory of {len(cand)}")
        base: list[Path] = []
        for ref in refs[:-1]:
            for path in run_folders(ref, results_dir):
                if path.resolve() not in {p.resolve() for p in base}:
                    base.append(path)
        if cand[0].resolve() in {p.resolve() for p in base}:
            raise UserError(f"{refs[-1]}: the candidate is also a baseline run")
        baselines = [load_path(p) for p in base]
        candidate = load_path(cand[0])
        text = reports.build_compare_report(baselines, candidate, gates, cfg)
        target = out_file or (out_dir or Path()) / f"compare-{baselines[0].run_id}-vs-{candidate.run_id}.html"
    elif fleet_mode:
        from harness.compare import load_config

        from harness.fleet import node_paths

        cfg = load_config(config_path)
        # Summaries only (manifest, cases, indicators): never every raw sample of a fleet.
        text = reports.build_fleet_report(node_paths(refs, results_dir), cfg)
        target = out_file or (out_dir or Path()) / "fleet-report.html"
    else:
        if len(refs) != 1:
            raise UserError(f"report: one RUN expected, got {len(refs)} (use --compare or --fleet for several)")
        from harness.store import resolve_run

        path = resolve_run(refs[0], results_dir)
        text = reports.build_run_report(load_path(path))
        target = out_file or (out_dir or path) / "report.html"
    try:
        written = reports.write_html(target, text)
    except OSError as exc:
        raise UserError(f"--output {target}: cannot write ({exc.strerror})") from None
    click.echo(f"report → {written}")



@main.command()
@click.option("--devices", default="cpu", show_default=True, help="Devices to validate on (as for `run`).")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / "validate", show_default=True, help="Folder that receives the experiment runs.")
@click.option("--suite", "suite_ref", default=None, help="Suite to perturb (default configs/validate.yaml).")
@click.option("--experiment", "experiments", multiple=True, help="Only this experiment (repeatable): 'noisy neighbour', 'slow rank', 'rate-limited link', 'paged KV'.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def validate(devices, out, suite_ref, experiments, as_json) -> None:
    """Run the perturbation experiments of INDICATORS.md §5 and check that each
    indicator responds (exit 1 if one does not, or if the null repeat fires one).

    Six runs of a small suite: a baseline and its null repeat (the noise band), then
    under a CPU hog on every core (mode 4), with one rank of the tensor-parallel step
    delayed (mode 1), over a loopback shaped by `tc tbf` (mode 3; needs root and
    iproute2, else reported as not run), and with the KV cache sent as paged blocks
    (mode 2). Every process it starts is killed by pid, and the shaping removed, when
    it ends."""
    import json as _json

    not_empty("--devices", devices)

    from harness.validate import print_report
    from harness.validate import validate as run_validate

    report = run_validate(devices, out, suite_ref, log=(lambda *_: None) if as_json else (lambda m: click.echo(m, err=True)),
                          only=tuple(experiments))
    if as_json:
        click.echo(_json.dumps(report, indent=1, default=str))
    else:
        print_report(report)
    sys.exit(report["exit_code"])


if __name__ == "__main__":  # pragma: no cover
    main()
