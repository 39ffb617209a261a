"""After the cases: a finished run folder's indicators (collect) and its HTML report.

Both the plain run (harness.run_command) and the torchrun path (harness.distributed)
end here; a failure in either is a warning and leaves the run as it is on disk.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import UserError


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
