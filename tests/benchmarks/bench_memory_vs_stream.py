#!/usr/bin/env python3
"""Side-by-side: the memory.triad probe (PyTorch, through the harness worker) against a
STREAM-style triad in C (OpenMP, gcc -O3 -march=native), on the same array size and
thread count.

The question it answers: does the probe report the machine's memory bandwidth, or the
overhead of the framework and the harness around it? The target is the probe within
20 % of the C triad (best-of-rounds ratio >= 0.80).

Host memory bandwidth on a shared VM drifts by tens of percent minute to minute, so a
single back-to-back pair says little. The two sides run in alternating order for
several rounds; each side's figure per round is its best iteration, and the verdict is
on the best of rounds (the least-disturbed moment each side saw), with the median of
rounds printed beside it as the typical figure.

Run from the repository root:  python tests/benchmarks/bench_memory_vs_stream.py
Exit status: 0 PASS or SKIPPED (no gcc / no OpenMP), 1 FAIL or error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from rounds import RoundTable, arg_parser, best_and_median, local_case, orders, parse_checked, run_case

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "stream_triad.c"
BUILD = HERE / "_build"  # git-ignored
BINARY = BUILD / "stream_triad"
TARGET = 0.80
MIB = 2**20
FP64_BYTES = 8

OMP_CHECK_SOURCE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def parse_args() -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--size-mib", default="auto", help="MiB per array for both sides; auto = the probe's own choice (4 x LLC)")
    p.add_argument("--reps", type=int, default=50, help="timed iterations per side per round (probe max_reps, C NTIMES; default 50)")
    args = parse_checked(p, "--rounds and --reps must be at least 1", rounds=1, reps=1)
    if args.size_mib != "auto":
        try:
            args.size_mib = int(args.size_mib)
        except ValueError:
            p.error(f"--size-mib: expected an integer or 'auto', got {args.size_mib!r}")
        if args.size_mib < 1:
            p.error("--size-mib must be at least 1")
    return args


def skip(reason: str) -> None:
    print(f"SKIPPED: {reason}")
    sys.exit(0)


def build_reference() -> list[str]:
    """Compile stream_triad.c; skip (not fail) where the toolchain can't do OpenMP,
    since that says nothing about the probe."""
    gcc = shutil.which("gcc")
    if gcc is None:
        skip("gcc not found on PATH; the C reference triad cannot be built")
    BUILD.mkdir(exist_ok=True)

    # A separate tiny OpenMP build tells "no OpenMP" (skip) apart from a broken
    # stream_triad.c (a real error).
    omp_check = BUILD / "omp_check"
    probe_build = subprocess.run(
        [gcc, "-fopenmp", "-x", "c", "-", "-o", str(omp_check)],
        input=OMP_CHECK_SOURCE, capture_output=True, text=True,
    )
    if probe_build.returncode != 0 or subprocess.run([str(omp_check)], capture_output=True).returncode != 0:
        first = (probe_build.stderr.strip().splitlines() or ["the test program did not run"])[0]
        skip(f"gcc cannot build or run OpenMP programs ({first})")

    cmd = [gcc, "-O3", "-march=native", "-fopenmp", "-o", str(BINARY), str(SOURCE)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        print(f"ERROR: compiling the C reference failed:\n$ {shlex.join(cmd)}\n{built.stderr}", file=sys.stderr)
        sys.exit(1)
    return cmd


def run_reference(elements: int, reps: int, warmup: int, threads: int) -> dict:
    # Same thread count as torch, threads packed on neighbouring places, so the C side
    # gets no more of the machine than the probe does.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "close"}
    out = subprocess.run([str(BINARY), str(elements), str(reps), str(warmup)], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        print(f"ERROR: C triad exited {out.returncode}:\n{out.stdout}{out.stderr}", file=sys.stderr)
        sys.exit(1)
    fields = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if int(fields["threads"]) != threads:
        print(f"ERROR: C triad ran {fields['threads']} threads, expected {threads}", file=sys.stderr)
        sys.exit(1)
    return {"best": float(fields["best_Bps"]), "median": float(fields["median_Bps"]), "reps": int(fields["ntimes"])}


class ProbeRunner:
    """The memory.triad case through the harness's own worker code path (run_case), in
    this process, so the probe's figure includes whatever the harness adds."""

    def __init__(self, size_mib, reps: int):
        self.warmup = 2
        self.spec = local_case("memory.triad", {"size_mib": size_mib, "dtype": "fp64"},
                               {"warmup": self.warmup, "warmup_s": 0.0, "min_reps": min(10, reps), "max_reps": reps,
                                "budget_s": 1.0})

    def run(self) -> dict:
        res = run_case(self.spec)
        if res["status"] != "ok":
            print(f"ERROR: probe case {res['status']}: {res['reason']}", file=sys.stderr)
            sys.exit(1)
        nbytes = res["work"]["bytes"]
        d = res["durations_s"]
        return {
            "best": nbytes / min(d),
            "median": nbytes / statistics.median(d),
            "reps": len(d),
            "warmup": res["warmup"],  # includes the worker's untimed run before the check
            "elements": res["extra"]["elements"],
            "size_mib": res["resolved_params"]["size_mib"],
        }


def gbps(bps: float) -> str:
    return f"{bps / 1e9:7.2f}"


def main() -> int:
    args = parse_args()
    cmd = build_reference()

    import torch

    threads = torch.get_num_threads()
    probe = ProbeRunner(args.size_mib, args.reps)

    print(f"compiler: {shlex.join(cmd)}")
    print(f"threads:  {threads} (torch.get_num_threads(); C: OMP_NUM_THREADS={threads} OMP_PROC_BIND=close)")
    print(f"torch {torch.__version__}; probe timing {probe.spec['timing']}")
    print("bandwidth in GB/s (1e9 B/s), STREAM counting: 3 arrays x 8 B x N per iteration")
    print()

    table = RoundTable(11, ("probe best", 10), ("probe med", 9), ("C best", 7), ("C med", 7), ("best ratio", 10))
    rows: list[tuple[float, float]] = []
    elements = None
    # The first round starts with the probe: its resolved size sets the C array size.
    for r, order in orders(args.rounds, "probe", "C"):
        got = {}
        for side in order:
            if side == "probe":
                got["probe"] = probe.run()
                if elements is None:
                    elements = got["probe"]["elements"]
                    print(f"array:    {elements} fp64 elements per array ({got['probe']['size_mib']} MiB), same on both sides")
                    print()
                    print(table.header())
                elif got["probe"]["elements"] != elements:
                    print("ERROR: the probe changed its array size between rounds", file=sys.stderr)
                    return 1
            else:
                # Same untimed warm-up count as the probe (its warmup + the check run).
                got["C"] = run_reference(elements, args.reps, probe.warmup + 1, threads)
        p, c = got["probe"], got["C"]
        rows.append((p["best"], c["best"]))
        print(table.row(r, order, gbps(p["best"]), gbps(p["median"]), gbps(c["best"]), gbps(c["median"]),
                        p["best"] / c["best"]) + f"   (reps: probe {p['reps']}, C {c['reps']})")

    return best_and_median(rows, ("probe", "C"), gbps, TARGET, "target: probe within 20 % of C")


if __name__ == "__main__":
    sys.exit(main())
