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


if __name__ == "__main__":  # pragma: no cover
    main()
