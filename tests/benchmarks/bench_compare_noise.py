#!/usr/bin/env python3
"""How often `coherence compare` is wrong on this machine, and whether it blames load.

Runs the 20-case CPU suite ``tests/benchmarks/noise_suite.yaml`` many times with
``coherence run --rounds N`` (the real CLI, one subprocess per run) and compares the
runs with harness.compare (the code behind `coherence compare`, default config):

- **A/A, same background load on both sides** — ``--pairs`` + 1 runs with nothing of
  ours in the background ("none") and as many with one busy loop running through each
  run ("one busy loop"). Consecutive runs form the pairs (run i = baseline, run i+1 =
  candidate, one baseline run each). Nothing changed, so every regressed/improved case
  is a false verdict; the target (issue 18) is at most 1 per 100 cases at --rounds 3.
  Verdicts marked "(load)" are counted too and also shown apart: the loads of the two
  sides differed by more than compare.load.differ (other people's work on a shared
  machine).
- **Hog** — two candidate runs with two busy loops running through them, each compared
  against a quiet run: the share of compute-bound cases (cases.parquet ``bound``) called
  regressed, and called ``regressed (load)`` (target: at least 80 %).
- **Cost of rounds** — two quiet runs at --rounds 1 interleaved with the others: the
  wall time of a run at --rounds N against --rounds 1 (G's budget split keeps it from
  being N times), and today's single-round comparison of them for reference.

The busy loops are children of this script, never of the measured run, so the run's
telemetry sees them as foreign load. Runs are interleaved (quiet, busy, quiet, ...) so a
slow drift of the machine does not fall on one condition. The worker's thread pools run
one thread (OMP_NUM_THREADS=1, --threads): on a 2-core VM with neighbours, a 2-thread
GEMM's barrier waits turn into scheduler-tick stalls (4-50 ms on a 100 µs kernel) that
say more about the spin-wait than about the comparison.

Run from the repository root:  python tests/benchmarks/bench_compare_noise.py
(about 15 minutes on a 2-core VM; --pairs 2 for a shorter look). Prints a table, writes
``summary.json`` and the runs under ``--out`` (a temporary folder unless given).
Exit status: 0 when both targets hold, 1 when one does not or a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = Path(__file__).resolve().parent / "noise_suite.yaml"
FALSE_PER_100_TARGET = 1.0
HOG_TARGET = 0.80
BUSY = "while True:\n    pass\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=5, help="A/A pairs per background condition (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the worker (default 1)")
    p.add_argument("--out", default=None, help="folder for the runs and summary.json (default: a temporary one)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per run (default 600)")
    p.add_argument("--suite", default=str(SUITE), help="suite YAML (default noise_suite.yaml beside this script)")
    args = p.parse_args()
    if args.pairs < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--pairs, --rounds and --threads must be at least 1")
    return args


def busy_loops(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=True) for _ in range(k)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=30)


def coherence_run(out: Path, label: str, rounds: int, hogs: int, args) -> tuple[Path, float]:
    """One `coherence run` of the suite with ``hogs`` busy loops beside it: (run folder,
    wall seconds of the run itself)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [str(ROOT / ".venv" / "bin" / "coherence"), "run", "--suite", args.suite, "--devices", "cpu",
           "--rounds", str(rounds), "--out", str(out), "--no-report", "--quiet", "--label", label]
    loops = busy_loops(hogs)
    try:
        time.sleep(0.5 if hogs else 0)  # the loops are running before the run starts
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
        wall = time.monotonic() - t0
    finally:
        stop(loops)
    if proc.returncode != 0:
        raise SystemExit(f"run {label} failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(f"  {label:<10} {wall:6.1f} s  {path.name}", flush=True)
    return path, wall


def compare(a: Path, b: Path) -> dict:
    from harness.compare import compare_runs, load_config, parse_gate
    from harness.results import load_path

    cfg = load_config()
    return compare_runs(load_path(a), load_path(b), parse_gate(cfg["compare"]["gate"]), cfg)


def verdicts(doc: dict) -> dict:
    rows = doc["cases"]
    wrong = [r for r in rows if r["verdict"] != "unchanged"]
    return {"compared": len(rows), "false": len(wrong),
            "false_unattributed": sum(1 for r in wrong if "(load)" not in r["verdict_label"]),
            "false_load": sum(1 for r in wrong if "(load)" in r["verdict_label"]),
            "foreign_a": doc["summary"]["load"]["foreign_cpu_a"], "foreign_b": doc["summary"]["load"]["foreign_cpu_b"],
            "cases": [f"{r['case_id']}: {r['verdict_label']}" for r in wrong],
            # held: called by the statistics of the case alone, but not beyond its noise
            # once the whole-run shift of its bound class is taken out (harness.compare)
            "held_by_run_shift": doc["summary"].get("held_by_run_shift", 0),
            "run_shift": [sh["why"] for sh in doc.get("run_shift") or []]}


def main() -> int:
    args = parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-compare-noise-"))
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    n = args.pairs + 1
    runs: dict[str, list[tuple[Path, float]]] = {"none": [], "one busy loop": [], "hog": [], "rounds 1": []}
    # Interleaved plan: quiet/busy alternate; the hog and single-round runs go in between.
    plan: list[tuple[str, int, int]] = []
    for i in range(n):
        plan += [("none", args.rounds, 0), ("one busy loop", args.rounds, 1)]
        if i in (1, 3):
            plan.append(("hog", args.rounds, 2))
        if i in (2, 4):
            plan.append(("rounds 1", 1, 0))
    for kind, need in (("hog", 2), ("rounds 1", 2)):
        plan += [(kind, args.rounds if kind == "hog" else 1, 2 if kind == "hog" else 0)] * max(
            0, need - sum(1 for k, _, _ in plan if k == kind))
    print(f"{len(plan)} runs of {Path(args.suite).name} (--rounds {args.rounds}, {args.threads} worker thread(s)) into {out}",
          flush=True)
    t_start = time.monotonic()
    for idx, (kind, rounds, hogs) in enumerate(plan):
        runs[kind].append(coherence_run(out, f"{kind.replace(' ', '-')}-{idx}", rounds, hogs, args))

    rows = []
    for kind in ("none", "one busy loop"):
        pairs = [verdicts(compare(runs[kind][i][0], runs[kind][i + 1][0])) for i in range(len(runs[kind]) - 1)]
        rows.append((f"A/A, {kind} (rounds {args.rounds})", pairs))
    single = [verdicts(compare(runs["rounds 1"][0][0], runs["rounds 1"][1][0]))]
    rows.append(("A/A, none (rounds 1: one unit a side)", single))

    hog = []
    for i, (path, _) in enumerate(runs["hog"]):
        doc = compare(runs["none"][i][0], path)
        from harness.results import load_path

        bound = {str(r["case_id"]): r.get("bound") for r in load_path(path).cases.to_dict(orient="records")}
        cpu = [r for r in doc["cases"] if bound.get(r["case_id"]) == "compute"]
        hog.append({"compared": len(doc["cases"]), "compute_bound": len(cpu),
                    "compute_regressed": sum(1 for r in cpu if r["verdict"] == "regressed"),
                    "compute_regressed_load": sum(1 for r in cpu if r["verdict_label"] == "regressed (load)"),
                    "all_regressed": sum(1 for r in doc["cases"] if r["verdict"] == "regressed"),
                    "all_regressed_load": sum(1 for r in doc["cases"] if r["verdict_label"] == "regressed (load)"),
                    "foreign_a": doc["summary"]["load"]["foreign_cpu_a"],
                    "foreign_b": doc["summary"]["load"]["foreign_cpu_b"]})

    def pct(v):
        return "—" if v is None else f"{v:.0%}"

    print(f"\nA/A comparisons (one baseline run against one candidate run; {time.monotonic() - t_start:.0f} s "
          "of runs)")
    print(f"{'condition':<42} {'pairs':>5} {'cases':>6} {'false':>6} {'/100':>6} {'of them (load)':>15} "
          f"{'foreign CPU A→B (median of pairs)':>34}")
    summary = {"rounds": args.rounds, "threads": args.threads, "out": str(out), "aa": {}, "hog": hog}
    for name, pairs in rows:
        cases = sum(p["compared"] for p in pairs)
        false = sum(p["false"] for p in pairs)
        load = sum(p["false_load"] for p in pairs)
        fa = sorted(p["foreign_a"] for p in pairs if p["foreign_a"] is not None)
        fb = sorted(p["foreign_b"] for p in pairs if p["foreign_b"] is not None)
        med = (lambda v: v[len(v) // 2] if v else None)
        per100 = 100.0 * false / cases if cases else float("nan")
        print(f"{name:<42} {len(pairs):>5} {cases:>6} {false:>6} {per100:>6.1f} {load:>15} "
              f"{pct(med(fa)) + ' → ' + pct(med(fb)):>34}")
        for p in pairs:
            for c in p["cases"]:
                print(f"    {c}")
        held = sum(p.get("held_by_run_shift", 0) for p in pairs)
        if held:
            print(f"    ({held} verdicts held by a whole-run shift within the run-level floor; "
                  "the shifts are in summary.json)")
        summary["aa"][name] = {"pairs": pairs, "cases": cases, "false": false, "false_load": load,
                               "per_100": per100}
    print("\nhog: two busy loops during the candidate only (baseline: a quiet run)")
    for h in hog:
        print(f"  compute-bound cases regressed {h['compute_regressed']}/{h['compute_bound']} "
              f"({h['compute_regressed'] / max(1, h['compute_bound']):.0%}), of them regressed (load) "
              f"{h['compute_regressed_load']}/{h['compute_bound']}; all cases regressed {h['all_regressed']}/"
              f"{h['compared']}, (load) {h['all_regressed_load']}; foreign CPU {pct(h['foreign_a'])} → "
              f"{pct(h['foreign_b'])}")
    cb = sum(h["compute_bound"] for h in hog)
    share = sum(h["compute_regressed_load"] for h in hog) / cb if cb else float("nan")
    wall_r = [w for _, w in runs["none"]]
    wall_1 = [w for _, w in runs["rounds 1"]]
    cost = (sum(wall_r) / len(wall_r)) / (sum(wall_1) / len(wall_1))
    print(f"\ncost of rounds: a quiet run takes {sum(wall_r) / len(wall_r):.1f} s at --rounds {args.rounds} against "
          f"{sum(wall_1) / len(wall_1):.1f} s at --rounds 1 (ratio {cost:.2f})")
    aa = summary["aa"][f"A/A, none (rounds {args.rounds})"], summary["aa"][f"A/A, one busy loop (rounds {args.rounds})"]
    worst = max(a["per_100"] for a in aa)
    ok = worst <= FALSE_PER_100_TARGET and share >= HOG_TARGET
    summary.update({"hog_compute_regressed_load_share": share, "wall_s_rounds": wall_r, "wall_s_rounds_1": wall_1,
                    "wall_ratio": cost, "worst_false_per_100": worst, "pass": ok})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nfalse verdicts per 100 cases (worst condition, rounds {args.rounds}): {worst:.1f} "
          f"(target ≤ {FALSE_PER_100_TARGET:g}); compute-bound cases regressed (load) under the hog: {share:.0%} "
          f"(target ≥ {HOG_TARGET:.0%})")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
