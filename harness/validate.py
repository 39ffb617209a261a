"""`coherence validate`: the perturbation experiments of INDICATORS.md §5.

An indicator is trusted only once a controlled perturbation moves it and its absence
leaves it still. On the devices at hand this runs configs/validate.yaml

- twice unperturbed (the baseline and its null repeat: together they give each
  indicator's noise band, and the repeat must not fire any indicator),
- under a noisy neighbour: one busy-loop process per core on the same cores (mode 4:
  timer jitter and tails rise),
- with one rank slowed: a delay injected into rank 1's compute in every step of the
  tensor-parallel decode step (mode 1: straggler penalty rises),
- over a rate-limited link: the loopback (which Gloo's TCP transport uses between
  ranks on one host) shaped by ``tc qdisc … tbf`` when running as root with iproute2;
  network namespaces with a veth pair and netem are not needed for a rate limit, and
  where tc is unavailable the experiment is reported as not run, with the reason
  (mode 3: collective share rises; link efficiency falls where a nominal link exists),
- with the KV cache of the disaggregated request sent as scattered 16-token blocks
  instead of one contiguous buffer (mode 2: KV transfer share rises); on a GPU also
  host copies through pageable instead of pinned memory (pinning penalty).

Per indicator it prints the unperturbed value, the perturbed value, the noise band and
whether it moved the expected way beyond the band. Exit 1 when an indicator that could
be measured failed to respond, or the null repeat fired one; 0 otherwise. Every process
it starts is ended by its pid, and the loopback shaping removed, when it finishes or
fails.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.config import CONFIG_DIR

INJECT_ENV = "COHERENCE_INJECT_DELAY"  # "rank:seconds", read by the TP composite


@dataclass
class Experiment:
    name: str
    what: str
    expect: list[tuple[str, str]]  # (indicator path "modeN.name", "up" | "down")
    overrides: dict = field(default_factory=dict)  # probe -> params overrides
    perturbation: str | None = None  # "hog" | "link" | "delay"


EXPERIMENTS = [
    # Timer jitter as interruptions per second is not an expectation here: on a 2-core
    # Firecracker VM it read 580 and 694 /s unperturbed and 659 /s under the hog (a busy
    # neighbour lengthens the preemptions it causes rather than multiplying them); the
    # share of the loop's time spent interrupted is what rises.
    Experiment("noisy neighbour", "one busy-loop process per core, on the same cores", perturbation="hog",
               expect=[("mode4.tail_weight", "up"), ("mode4.timer_interrupted_share", "up")]),
    Experiment("slow rank", "a delay added to rank 1's compute in every TP step", perturbation="delay",
               expect=[("mode1.straggler_penalty", "up")]),
    Experiment("rate-limited link", "loopback shaped by tc tbf (Gloo's TCP between ranks)", perturbation="link",
               expect=[("mode3.collective_share", "up"), ("mode3.link_efficiency", "down")]),
    Experiment("paged KV", "the disaggregated request's KV sent as scattered 16-token blocks",
               overrides={"composite.disagg_request": {"kv_layout": "paged"}},
               expect=[("mode2.kv_transfer_share", "up")]),
]


def value_of(doc: dict, path: str):
    mode, name = path.split(".", 1)
    ind = (doc.get(mode) or {}).get(name) or {}
    return ind.get("value"), ind.get("reason")


def band(base1, base2, floor: float) -> float:
    return max(abs(base2 - base1), floor * abs(base1))


def judge(base1, base2, perturbed, direction: str, floor: float) -> dict:
    """Did ``perturbed`` move the expected way beyond the noise band of the baseline?"""
    if base1 is None or perturbed is None:
        return {"verdict": "not measurable"}
    b2 = base2 if base2 is not None else base1
    width = band(base1, b2, floor)
    ref = (base1 + b2) / 2
    delta = perturbed - ref
    moved = delta > width if direction == "up" else -delta > width
    return {"verdict": "responds" if moved else "does not respond", "band": width, "delta": delta}


def null_fires(base1, base2, null_floor: float, null_abs: float = 0.0) -> bool | None:
    if base1 is None or base2 is None:
        return None
    return abs(base2 - base1) > max(null_floor * max(abs(base1), abs(base2), 1e-30), null_abs)


class Perturbation:
    """Starts and always ends one perturbation (processes by pid, tc qdisc)."""

    def __init__(self, kind: str | None, cfg: dict):
        self.kind, self.cfg = kind, cfg
        self.pids: list[int] = []
        self.qdisc = False
        self.unavailable: str | None = None

    def __enter__(self) -> Perturbation:
        if self.kind == "hog":
            n = self.cfg.get("hog_processes", "auto")
            n = len(os.sched_getaffinity(0)) if n == "auto" else int(n)
            # Each hog dies with this process (harness.lifeline), also when it is killed
            # before __exit__ runs: an orphaned busy loop would spin for ever.
            hog = ("import sys\nfrom harness.lifeline import die_with_parent\n"
                   "die_with_parent(int(sys.argv[1]))\nwhile True: pass")
            for _ in range(n):
                proc = subprocess.Popen([sys.executable, "-c", hog, str(os.getpid())], start_new_session=True)
                self.pids.append(proc.pid)
        elif self.kind == "delay":
            os.environ[INJECT_ENV] = f"1:{float(self.cfg.get('slow_rank_delay_s', 0.010))}"
        elif self.kind == "link":
            tc = shutil.which("tc")
            if os.geteuid() != 0 or tc is None:
                self.unavailable = "needs root and iproute2's tc to shape the loopback"
            else:
                rate = str(self.cfg.get("link_rate", "10mbit"))
                burst = str(self.cfg.get("link_burst", "70kb"))
                proc = subprocess.run([tc, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                                       "burst", burst, "latency", "400ms"], capture_output=True, text=True,
                                      timeout=30)
                if proc.returncode != 0:
                    self.unavailable = f"tc qdisc add failed: {proc.stderr.strip()[:200]}"
                else:
                    self.qdisc = True
        return self

    def __exit__(self, *exc) -> None:
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.pids = []
        os.environ.pop(INJECT_ENV, None)
        if self.qdisc:
            subprocess.run([shutil.which("tc") or "tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True,
                           timeout=30)
            self.qdisc = False


def suite_for(base: dict, overrides: dict) -> dict:
    doc = copy.deepcopy(base)
    for probe, params in overrides.items():
        entry = doc["probes"].setdefault(probe, {})
        entry["params"] = {**(entry.get("params") or {}), **params}
    return doc


def run_one(suite_doc: dict, workdir: Path, label: str, devices: str | None, out: Path) -> dict:
    """One quiet run of ``suite_doc``; returns its indicators document."""
    from harness.results import read_indicators
    from harness.run_command import run_suite

    path = workdir / f"{label.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(suite_doc, sort_keys=False))
    import contextlib
    import io

    # A quiet run prints its folder on stdout; validate's stdout is its own report.
    with contextlib.redirect_stdout(io.StringIO()):
        outcome = run_suite(suite_ref=str(path), devices_spec=devices, probe_names=(), backend="torch", out=out,
                            label=f"validate: {label}", resume=None, timeout_s=None, anonymize=False, quiet=True,
                            report=False)  # the experiments need their indicators, not an HTML report
    run_dir = outcome.path
    doc = read_indicators(run_dir) or {}
    return {"run": str(run_dir), "doc": doc, "counts": outcome.counts}


def validate(devices: str | None, out: Path, suite: str | None = None, log=print,
             only: tuple[str, ...] = ()) -> dict:
    from harness.collector.common import load_config
    from harness.config import parse_suite, read_yaml, suite_path

    cfg = load_config()
    vcfg = cfg.get("validate") or {}
    floor = float(vcfg.get("floor", 0.10))
    null_floor = float(vcfg.get("null_floor", 0.5))
    null_abs = vcfg.get("null_abs") or {}
    from harness.errors import UserError

    known = [e.name for e in EXPERIMENTS]
    for name in only:
        if name not in known:
            raise UserError(f"--experiment: unknown experiment '{name}' (known: {', '.join(known)})")
    experiments = [e for e in EXPERIMENTS if not only or e.name in only]
    # The suite checked as `run` checks it (UTF-8, duplicate keys, every value), before
    # any folder is made or run started.
    base_path = suite_path(suite) if suite else CONFIG_DIR / "validate.yaml"
    base_doc = read_yaml(base_path)
    parse_suite(base_doc, str(base_path))
    out.mkdir(parents=True, exist_ok=True)
    report = {"floor": floor, "null_floor": null_floor, "runs": {}, "experiments": [], "null": []}
    with tempfile.TemporaryDirectory(prefix="coherence-validate-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        log("baseline …")
        base1 = run_one(base_doc, work, "baseline", devices, out)
        log("null repeat …")
        base2 = run_one(base_doc, work, "null repeat", devices, out)
        report["runs"]["baseline"], report["runs"]["null repeat"] = base1["run"], base2["run"]
        checked = sorted({p for e in experiments for p, _ in e.expect})
        for path in checked:
            v1, _ = value_of(base1["doc"], path)
            v2, _ = value_of(base2["doc"], path)
            report["null"].append({"indicator": path, "baseline": v1, "repeat": v2,
                                   "fires": null_fires(v1, v2, null_floor, float(null_abs.get(path, 0.0)))})
        for exp in experiments:
            log(f"{exp.name} …")
            with Perturbation(exp.perturbation, vcfg) as pert:
                if pert.unavailable:
                    report["experiments"].append({"experiment": exp.name, "what": exp.what,
                                                  "not_run": pert.unavailable, "results": []})
                    continue
                run = run_one(suite_for(base_doc, exp.overrides), work, exp.name, devices, out)
            report["runs"][exp.name] = run["run"]
            results = []
            for path, direction in exp.expect:
                v1, reason = value_of(base1["doc"], path)
                v2, _ = value_of(base2["doc"], path)
                vp, reason_p = value_of(run["doc"], path)
                res = judge(v1, v2, vp, direction, floor)
                results.append({"indicator": path, "expected": direction, "baseline": v1, "repeat": v2,
                                "perturbed": vp, **res,
                                **({"reason": reason or reason_p} if res["verdict"] == "not measurable" else {})})
            report["experiments"].append({"experiment": exp.name, "what": exp.what, "results": results})
        report["elapsed_s"] = time.monotonic() - t
    responded = [r for e in report["experiments"] for r in e["results"] if r["verdict"] != "not measurable"]
    failed = [r for r in responded if r["verdict"] != "responds"]
    fired = [n for n in report["null"] if n["fires"]]
    report["exit_code"] = 1 if failed or fired else 0
    report["did_not_respond"] = [r["indicator"] for r in failed]
    report["null_fired"] = [n["indicator"] for n in fired]
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="coherence validate")
    for col in ("experiment", "indicator", "expected", "baseline", "repeat", "perturbed", "noise band", "verdict"):
        table.add_column(col, overflow="fold")

    def fmt(v):
        return "—" if v is None else f"{v:.4g}"

    for exp in report["experiments"]:
        if exp.get("not_run"):
            table.add_row(exp["experiment"], "—", "—", "—", "—", "—", "—", f"[yellow]not run: {exp['not_run']}[/]")
            continue
        for r in exp["results"]:
            style = {"responds": "green", "does not respond": "red"}.get(r["verdict"], "dim")
            verdict = r["verdict"] + (f" ({r['reason']})" if r.get("reason") else "")
            table.add_row(exp["experiment"], r["indicator"], r["expected"], fmt(r["baseline"]), fmt(r["repeat"]),
                          fmt(r["perturbed"]), fmt(r.get("band")), f"[{style}]{verdict}[/]")
    for n in report["null"]:
        verdict = {True: "[red]fires[/]", False: "[green]still[/]", None: "[dim]not measurable[/]"}[n["fires"]]
        table.add_row("null repeat", n["indicator"], "still", fmt(n["baseline"]), fmt(n["repeat"]), "—",
                      f"±{report['null_floor']:.0%}", verdict)
    console.print(table)
    console.print(f"runs: {', '.join(f'{k} {v}' for k, v in report['runs'].items())}")
    console.print(f"elapsed {report.get('elapsed_s', 0):.0f} s; exit {report['exit_code']}")
