"""HTML reports: one self-contained file each (inline SVG plots, inline CSS, no script,
no network needed to view it; a Content-Security-Policy forbids external resources).

- :func:`build_run_report` — one run: environment fingerprint with virtualization
  layers, the capacity waterfall (nominal → effective) and ladder, a roofline per
  device (every case with FLOPs and bytes by arithmetic intensity and achieved rate,
  against nominal and measured ceilings), latency CDFs per family, collective busbw
  against size per world size, the transfer bandwidth heatmap and KV layouts, the
  mode 1–4 indicators with verdicts and the cases behind each, and every failed,
  timed-out and skipped case with its reason.
- :func:`build_compare_report` — mode 5 between runs (``harness.compare``): CDF
  overlays, SLA amplification, the verdict table and the fingerprint diff.
- :func:`build_fleet_report` — many runs (``harness.fleet``): the outlier chart and
  capacity by node and device class.

Plots are ``<figure data-plot=KIND>`` elements (kinds in :data:`RUN_PLOTS`,
:data:`COMPARE_PLOTS`, :data:`FLEET_PLOTS`); a plot without data says why instead of
being left out. matplotlib (the ``plot`` extra) is imported only while plotting; without
it the report keeps every table and says the plots are unavailable.
"""

from __future__ import annotations

from pathlib import Path

RUN_PLOTS = ("capacity-waterfall", "roofline", "latency-cdf", "collective-busbw", "transfer-heatmap", "kv-layout")
COMPARE_PLOTS = ("cdf-overlay", "sla-amplification")
FLEET_PLOTS = ("fleet-outliers", "fleet-capacity")


def _generator() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"coherence {version('coherence')}"
    except PackageNotFoundError:
        return "coherence"


def build_run_report(run) -> str:
    """The HTML report of a loaded run (:class:`harness.results.Run`)."""
    from harness.report import run_report

    return run_report.build(run, _generator())


def build_compare_report(baselines, candidate, gates: dict, cfg: dict) -> str:
    """The HTML report of ``compare_runs(baselines, candidate, gates, cfg)``."""
    from harness.report import compare_report

    return compare_report.build(list(baselines), candidate, gates, cfg, _generator())


def build_fleet_report(runs, cfg: dict) -> str:
    """The HTML report of the fleet view of ``runs``: run folders (paths; read as
    summaries by harness.fleet.fleet_view_paths) or loaded harness.results.Run objects."""
    from harness.report import fleet_report

    return fleet_report.build(list(runs), cfg, _generator())


def write_html(target: Path, text: str) -> Path:
    """Write atomically (a temporary file in the same folder, then rename)."""
    from harness import atomic

    # harness.atomic: mode 0644, refuses a target that is not a regular file, one line
    # (UserError) on a read-only or full disk.
    return atomic.write_text(Path(target), text, parents=True)


def write_run_report(run_path: Path, target: Path | None = None) -> Path:
    """Load the run folder and write its report (default ``RUN/report.html``)."""
    from harness.results import load_path

    run = load_path(Path(run_path))
    return write_html(Path(target) if target else Path(run_path) / "report.html", build_run_report(run))
