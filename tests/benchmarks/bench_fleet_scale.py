#!/usr/bin/env python3
"""`coherence fleet` over 100, 1,000 and 10,000 node runs: wall time, peak memory, and
whether the one node perturbed on purpose is the one flagged (issue 19, item 4).

The synthetic fleet is made of copies of one real run (``--template RUN``; default: a
quick run made here with ``coherence run --suite quick``): each node gets its own run
id and host, and every case's figures (p50, per-round p50, best rates) are multiplied by
a node factor drawn from a log-normal of 2 % (the spread of healthy nodes) and a case
factor of 1 %. One node per size has one probe family 60 % slower (its p50 × 1.6, its
rates ÷ 1.6): the node a fleet view must flag, and the only one. samples.parquet and
telemetry.parquet are hard links to the template's, so they exist as in a real fleet
but cost no disk: the fleet view must not read them.

Each size is measured by the real CLI in a subprocess (``coherence fleet DIR --parquet
table.parquet``): its wall time and its peak resident memory (``ru_maxrss`` of the
child, from os.wait4). Target: 10,000 runs in at most 60 s and 2 GiB, memory flat as the
count grows (issue 19).

Run from the repository root:  python tests/benchmarks/bench_fleet_scale.py
(--sizes 100,1000 for a shorter look). Exit status 0 when every size flags exactly the
perturbed node and the 10,000-run target holds, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
TARGET_S, TARGET_BYTES = 60.0, 2 * 1024 ** 3
RATE_COLUMNS = ("flops_per_s", "bytes_per_s", "best_flops_per_s", "best_bytes_per_s", "busbw_Bps", "best_busbw_Bps",
                "algbw_Bps", "best_algbw_Bps")
TIME_COLUMNS = ("p50_s", "p90_s", "p99_s", "mean_s", "min_s", "max_s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,1000,10000", help="node counts (default 100,1000,10000)")
    p.add_argument("--template", default=None, help="a run folder to copy (default: make a quick run)")
    p.add_argument("--out", default=None, help="folder for the synthetic fleets (default: a temporary one, removed)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per fleet command")
    return p.parse_args()


def coherence() -> list[str]:
    return [sys.executable, "-m", "harness.cli"]


def make_template(out: Path) -> Path:
    print("making the template: coherence run --suite quick (a few minutes)", flush=True)
    proc = subprocess.run([*coherence(), "run", "--suite", "quick", "--out", str(out), "--no-report", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    runs = sorted(p for p in out.iterdir() if (p / "manifest.json").exists())
    if not runs:
        raise SystemExit(f"the template run failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return runs[-1]


def perturbed_family(cases: pd.DataFrame) -> str:
    """The probe family the odd node is slow in: the ok family with the most cases."""
    ok = cases[cases["status"] == "ok"]
    return str(ok["family"].value_counts().idxmax())


def scaled(cases: pd.DataFrame, factor: np.ndarray) -> pd.DataFrame:
    """cases with times × factor and rates ÷ factor (per row)."""
    out = cases.copy()
    for col in TIME_COLUMNS:
        if col in out.columns:
            out[col] = pd.to_numeric(out[col], errors="coerce") * factor
    for col in RATE_COLUMNS:
        if col in out.columns:
            out[col] = pd.to_numeric(out[col], errors="coerce") / factor
    if "round_p50_s" in out.columns:
        out["round_p50_s"] = [json.dumps([v * f for v in json.loads(t)]) if isinstance(t, str) else t
                              for t, f in zip(out["round_p50_s"], factor)]
    return out


def build_fleet(template: Path, dest: Path, n: int, odd: int, rng: np.random.Generator) -> None:
    manifest = json.loads((template / "manifest.json").read_text())
    cases = pd.read_parquet(template / "cases.parquet")
    family = perturbed_family(cases)
    in_family = (cases["family"] == family).to_numpy()
    dest.mkdir(parents=True)
    for i in range(n):
        run_id = f"node-{i:05d}"
        d = dest / run_id
        d.mkdir()
        doc = dict(manifest, run_id=run_id, host=f"host-{i:05d}", label=f"fleet {n}")
        (d / "manifest.json").write_text(json.dumps(doc))
        factor = np.exp(rng.normal(0, 0.02) + rng.normal(0, 0.01, len(cases)))
        if i == odd:
            factor = factor * np.where(in_family, 1.6, 1.0)
        scaled(cases, factor).to_parquet(d / "cases.parquet", index=False)
        for name in ("samples.parquet", "telemetry.parquet", "indicators.json"):
            if (template / name).exists():
                os.link(template / name, d / name)


def measure(fleet: Path, timeout: float) -> dict:
    table = fleet.parent / f"{fleet.name}-table.parquet"
    env = dict(os.environ, COLUMNS="400", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    proc = subprocess.Popen([*coherence(), "fleet", str(fleet), "--parquet", str(table)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "reason": f"timed out after {timeout:.0f} s"}
    wall = time.monotonic() - t0
    # communicate() reaped the child; its rusage is in RUSAGE_CHILDREN as the max so far,
    # so each size runs in a fresh process below (max over children never decreases).
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    m = re.search(r"(\d+) of (\d+) nodes flagged(?:: ([^\n]*))?", stdout)
    flagged = [s.strip() for s in m.group(3).split(",")] if m and m.group(3) else []
    return {"ok": proc.returncode == 0, "reason": stderr.strip()[-300:], "wall_s": wall, "peak_bytes": peak,
            "flagged": flagged, "nodes": int(m.group(2)) if m else None}


def main() -> int:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-fleet-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    template = Path(args.template) if args.template else make_template(out / "template")
    rng = np.random.default_rng(19)
    results = []
    try:
        for n in sizes:
            fleet = out / f"fleet-{n}"
            if fleet.exists():
                shutil.rmtree(fleet)
            odd = int(rng.integers(n))
            t0 = time.monotonic()
            build_fleet(template, fleet, n, odd, rng)
            built = time.monotonic() - t0
            # Each size in its own measuring process, so ru_maxrss is that size's peak.
            probe = subprocess.run([sys.executable, __file__, "--measure-only", str(fleet), str(args.timeout)],
                                   capture_output=True, text=True, timeout=args.timeout + 60)
            r = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.stdout.strip() else {
                "ok": False, "reason": probe.stderr[-300:]}
            r.update(n=n, odd=f"node-{odd:05d}", built_s=built)
            # Right: the perturbed node is flagged. Others beyond |z| 3.5 by chance are
            # counted (a healthy Gaussian fleet puts ~5 in 10,000 per family there).
            r["right"] = bool(r.get("ok") and r["odd"] in (r.get("flagged") or []))
            r["others"] = len([f for f in r.get("flagged") or [] if f != r["odd"]])
            results.append(r)
            print(f"{n:>6} runs: built in {built:.0f} s; fleet {r.get('wall_s', float('nan')):.1f} s, peak "
                  f"{r.get('peak_bytes', 0) / 2 ** 20:.0f} MiB; perturbed {r['odd']} "
                  f"{'flagged' if r['right'] else 'NOT flagged ' + str(r.get('reason'))}, "
                  f"{r['others']} other node(s) flagged", flush=True)
            shutil.rmtree(fleet, ignore_errors=True)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    big = [r for r in results if r["n"] >= 10000]
    target = all(r.get("wall_s", 1e9) <= TARGET_S and r.get("peak_bytes", 1e18) <= TARGET_BYTES for r in big)
    ok = all(r["right"] for r in results) and target
    print("\n  size   wall_s   peak_MiB  per_node_ms  perturbed_flagged  others_flagged")
    for r in results:
        print(f"{r['n']:>6} {r.get('wall_s', float('nan')):>8.1f} {r.get('peak_bytes', 0) / 2 ** 20:>10.0f} "
              f"{1e3 * r.get('wall_s', float('nan')) / r['n']:>12.2f}  {str(r['right']):>17}  {r['others']:>14}")
    if big:
        print(f"target: 10,000 runs in ≤ {TARGET_S:.0f} s and ≤ {TARGET_BYTES / 2 ** 30:.0f} GiB: "
              f"{'met' if target else 'MISSED'}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--measure-only":
        print(json.dumps(measure(Path(sys.argv[2]), float(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
