"""The `coherence` command line.

Heavy modules (torch, pandas, pynvml, the probes) are imported inside the commands,
never at module level, so `coherence --help` stays fast and `coherence env` works
where a framework is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from harness.errors import UserError

DEFAULT_OUT = Path("results")


class CoherenceGroup(click.Group):
    """Turns a UserError anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"coherence: error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=CoherenceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="coherence")
def main() -> None:
    """Benchmark harness for heterogeneous AI inference.

    Runs real probes (memory, GEMM, overhead; more families as they land) on the
    devices this node has, keeps every sample, and writes a versioned run folder
    results/<run_id>/ (manifest.json, cases.parquet, samples.parquet,
    telemetry.parquet).

    \b
    Typical use:
      coherence env                      # what this node is, layer by layer
      coherence list                     # probes, grids, devices they would run on
      coherence run --suite quick        # run a suite, write results/<run_id>/
      coherence show <run_id>            # the cases table of a run

    Exit codes: 0 all cases ok (or skipped), 1 some case failed or timed out,
    2 bad input (config, arguments, result files).
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
@click.option("--anonymize", is_flag=True, help="Replace host names, serials and UUIDs by stable pseudonyms.")
def env(as_json: bool, anonymize: bool) -> None:
    """Environment fingerprint: host, CPU, memory, OS, frameworks, devices per
    backend, NVIDIA GPUs (NVML) and every virtualization layer, each fact with how it
    was detected."""
    from harness import environment

    doc = environment.collect(anonymize=anonymize)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    from harness.show import print_environment

    print_environment(doc)


@main.command(name="list")
@click.option("--suite", default=None, help="Show the grids of this suite (name or YAML path) instead of the probes' defaults.")
@click.option("--devices", default=None, help="Limit to these devices (e.g. cpu,cuda:0).")
def list_probes(suite: str | None, devices: str | None) -> None:
    """Registered probes: family, parameter grid, work model, and the devices of this
    node they would run on."""
    from harness import config, environment, registry
    from harness.runner import resolve_devices
    from harness.show import print_probe_list

    probes = registry.discover()
    entries = None
    if suite:
        entries = {e.name: e for e in config.load_suite(suite).probes}
    available = resolve_devices(devices, environment.torch_devices())
    print_probe_list(probes, entries, available)


@main.command()
@click.option("--suite", "suite_ref", default=None, help="Suite name (configs/<name>.yaml) or path to a suite YAML. Default: quick.")
@click.option("--devices", default=None, help="Comma list: cpu, cuda, cuda:0, mps, all (default: all devices of this node).")
@click.option("--probe", "probes", multiple=True, help="Only this probe or family (repeatable; comma lists allowed).")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch"]), help="Framework the probes run on.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True, help="Folder that receives results/<run_id>/.")
@click.option("--label", default="", help="Free text stored in the manifest (e.g. 'before migration').")
@click.option("--resume", "resume", default=None, metavar="RUN_ID", help="Finish an interrupted run (run id under --out, or its folder).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None, help="Per-case time limit in seconds (overrides the suite's timeout_s).")
@click.option("--cpu-ranks", type=click.IntRange(min=1), default=None, help="CPU ranks (Gloo) for multi-rank probes (overrides the suite's cpu_ranks, default 2).")
@click.option("--anonymize", is_flag=True, help="Anonymize host names and serials in the manifest.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the run folder.")
def run(suite_ref, devices, probes, backend, out, label, resume, timeout_s, cpu_ranks, anonymize, quiet) -> None:
    """Run a suite and write results/<run_id>/.

    Every case runs in an isolated worker process under a time limit; a probe that
    raises, crashes its worker or overruns is recorded with its status and reason and
    the run goes on. Cases are written as they finish (manifest status 'partial'
    until the end), so a killed run keeps its finished cases and --resume completes it.
    """
    from harness.run_command import run_suite

    probe_names = tuple(p.strip() for item in probes for p in item.split(",") if p.strip())
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
    )
    sys.exit(outcome.exit_code)


@main.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True, help="Folder holding runs (for a run id).")
@click.option("--json", "as_json", is_flag=True, help="Print the cases as JSON records.")
def show(run_ref: str, out: Path, as_json: bool) -> None:
    """Print a run's summary and its cases table (RUN is a run id or a run folder)."""
    from harness import store
    from harness.show import print_run

    path = store.resolve_run(run_ref, out)
    manifest = store.read_manifest(path)
    cases = store.read_cases(path)
    if as_json:
        click.echo(cases.to_json(orient="records", indent=2))
        return
    print_run(manifest, cases)


@main.command()
@click.argument("baseline")
@click.argument("candidate")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True, help="Folder holding runs (for run ids).")
@click.option("--gate", default=None, help="Gated metrics and their limits, e.g. 'p50:+5%,p99:+10%,sla:2x' (default from configs/compare.yaml).")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, help="Family-wise significance level, Holm-corrected across cases (default 0.05).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Compare/fleet settings YAML (default configs/compare.yaml).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print the comparison as Markdown (for a PR or a ticket).")
def compare(baseline, candidate, out, gate, alpha, config_path, as_json, as_markdown) -> None:
    """Compare run CANDIDATE against run BASELINE, case by case (mode 5).

    Per case in both runs: p50 ratio with a bootstrap 95% CI, Mann-Whitney U p-value
    (Holm-corrected across cases), Kolmogorov-Smirnov statistic, p99 ratio, SLA
    amplification (violations of the case's SLO, else of the baseline's p99); then the
    mode 1-4 indicators (indicators.json) and the environment fingerprint diff; on
    different device classes, efficiency and performance per watt side by side.

    \b
    Verdict per case (gate 'p50:+5%,p99:+10%,sla:2x'):
      regressed  a gated metric is worse than its gate and the change is significant
                 (p50, sla: Holm-corrected p < alpha; p99: its 95% CI lies beyond the gate)
      improved   better than 1/gate under the same rule, nothing regressed
      unchanged  otherwise

    Exit codes: 0 no gated case regressed, 1 some gated case regressed, 2 bad input.
    """
    from harness.compare import (
        compare_runs,
        load_config,
        markdown,
        parse_gate,
        print_comparison,
        to_jsonable,
    )
    from harness.results import load_run

    if as_json and as_markdown:
        raise UserError("--json and --markdown: choose one")
    cfg = load_config(config_path)
    gates = parse_gate(gate) if gate is not None else parse_gate(cfg["compare"]["gate"])
    if alpha is not None:
        cfg["compare"]["alpha"] = alpha
    run_a = load_run(baseline, out)
    run_b = load_run(candidate, out)
    doc = compare_runs(run_a, run_b, gates, cfg)
    if as_json:
        click.echo(json.dumps(to_jsonable(doc), indent=2, default=str))
    elif as_markdown:
        click.echo(markdown(doc), nl=False)
    else:
        print_comparison(doc)
    sys.exit(doc["exit_code"])


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="RUN_OR_DIR...")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True, help="Folder holding runs (for run ids).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="Compare/fleet settings YAML (default configs/compare.yaml).")
@click.option("--z", "z_threshold", type=click.FloatRange(0, min_open=True), default=None, help="|robust z| threshold for flagging metrics and nodes (default 3.5).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the per-node metric table (values, class median, MAD, z, flag) as CSV.")
@click.option("--parquet", "parquet_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write the same table as Parquet.")
@click.option("--json", "as_json", is_flag=True, help="Print the fleet view as JSON.")
def fleet(refs, out, config_path, z_threshold, csv_path, parquet_path, as_json) -> None:
    """Fleet view of many runs (one per node): outliers within each device class.

    RUN_OR_DIR is a run id, a run folder, or a directory whose run folders are all
    taken. Per device class and case, the median time (p50_s) and the best rate of
    each node get a robust z-score (x - median)/(1.4826 MAD), the scale floored at 2%
    of the class median (fleet.min_scale_rel in the config); |z| > 3.5 flags the
    metric. A node is flagged when the median |z| of its metrics in a probe family
    (memory, gemm, ...) or a run indicator (epsilon, C_eff, C_nom) exceeds 3.5
    (fleet.node_rule: 'any' flags it on any single metric).
    With indicators.json: epsilon, C_eff, C_nom per node, and sum C_eff against sum
    C_nom (cost per effective token with a price per device-hour in the config).

    Exit codes: 0 (the fleet view is descriptive), 2 bad input.
    """
    from harness.compare import load_config
    from harness.fleet import fleet_view, jsonable, print_fleet, write_table
    from harness.results import load_path, run_folders

    cfg = load_config(config_path)
    if z_threshold is not None:
        cfg["fleet"]["z_threshold"] = z_threshold
    paths: list[Path] = []
    for ref in refs:
        for path in run_folders(ref, out):
            if path.resolve() not in {p.resolve() for p in paths}:
                paths.append(path)
    runs = [load_path(p) for p in paths]
    doc = fleet_view(runs, cfg)
    write_table(doc["long"], csv_path, parquet_path)
    if as_json:
        click.echo(json.dumps(jsonable(doc), indent=2, default=str))
    else:
        print_fleet(doc)


if __name__ == "__main__":  # pragma: no cover
    main()
