#!/usr/bin/env python3
"""Side-by-side: the gemm.square probe (through the harness worker) against a bare
``torch.matmul(a, b, out=c)`` loop timed with perf_counter_ns, at n=2048 fp32.

The question it answers: how much does the harness (worker, timing engine, clock
wrapper, probe kernel object) cost on top of the very call it measures? Both sides run
the same matmul on the same thread pool with the same warm-up and repetition counts, so
any gap is harness overhead. The target is the probe within 10 % of the bare loop
(best-of-rounds ratio >= 0.90).

On a noisy shared VM a GEMM's speed wanders from call to call, so the sides run in
alternating order for several rounds; each side's figure per round is its best call,
and the verdict is on the best of rounds, with the median of rounds printed beside it.

Run from the repository root:  python tests/benchmarks/bench_gemm_overhead.py
Exit status: 0 PASS, 1 FAIL or error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from rounds import RoundTable, arg_parser, best_and_median, local_case, orders, parse_checked, run_case

TARGET = 0.90


def parse_args() -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--n", type=int, default=2048, help="matrix side (default 2048)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per side per round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="probe timing warmup (default 2; the bare loop does this + 1)")
    return parse_checked(p, "--rounds, --reps and --n must be at least 1, --warmup at least 0",
                         rounds=1, reps=1, n=1, warmup=0)


class ProbeRunner:
    """The gemm.square case through the harness's own worker code path (run_case)."""

    def __init__(self, n: int, warmup: int, reps: int):
        # min_reps = max_reps pins the count, so the budget can't make it differ from
        # the bare loop's.
        self.spec = local_case("gemm.square", {"n": n, "dtype": "fp32"},
                               {"warmup": warmup, "warmup_s": 0.0, "min_reps": reps, "max_reps": reps, "budget_s": 1e9})

    def run(self) -> dict:
        res = run_case(self.spec)
        if res["status"] != "ok":
            print(f"ERROR: probe case {res['status']}: {res['reason']}", file=sys.stderr)
            sys.exit(1)
        return {"durations": res["durations_s"], "flops": res["work"]["flops"], "warmup": res["warmup"]}


def bare_loop(n: int, warmup: int, reps: int, seed: int) -> list[float]:
    """The reference: nothing between the clock reads but the matmul. Fresh inputs each
    round, as the probe makes its own each case; values drawn like the probe's (O(1)
    products), though fp32 GEMM speed does not depend on them."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen) / n**0.5
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    durations = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        torch.matmul(a, b, out=c)
        durations.append((time.perf_counter_ns() - t0) * 1e-9)
    if not torch.isfinite(c).all():  # a cheap guard that the loop did real work
        print("ERROR: bare matmul produced non-finite values", file=sys.stderr)
        sys.exit(1)
    return durations


def gflops(x: float) -> str:
    return f"{x / 1e9:8.1f}"


def main() -> int:
    args = parse_args()

    import torch

    probe = ProbeRunner(args.n, args.warmup, args.reps)
    flops = 2.0 * args.n**3
    # The worker runs the kernel once more, untimed, before its check: match it.
    bare_warmup = args.warmup + 1

    print(f"gemm.square n={args.n} fp32, {flops / 1e9:.1f} GFLOP per call")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"per side per round: {bare_warmup} untimed calls, {args.reps} timed calls; figures in GFLOP/s (1e9 FLOP/s)")
    print()
    table = RoundTable(12, ("probe best", 10), ("probe med", 9), ("bare best", 9), ("bare med", 8), ("best ratio", 10))
    print(table.header())

    rows: list[tuple[float, float]] = []
    for r, order in orders(args.rounds, "probe", "bare"):
        got = {}
        for side in order:
            if side == "probe":
                res = probe.run()
                if res["flops"] != flops or res["warmup"] != bare_warmup or len(res["durations"]) != args.reps:
                    print(f"ERROR: probe work/counts differ from the bare loop's: {res['flops']=} {res['warmup']=} "
                          f"reps={len(res['durations'])}", file=sys.stderr)
                    return 1
                got["probe"] = res["durations"]
            else:
                got["bare"] = bare_loop(args.n, bare_warmup, args.reps, seed=r)
        p_best, b_best = flops / min(got["probe"]), flops / min(got["bare"])
        p_med, b_med = flops / statistics.median(got["probe"]), flops / statistics.median(got["bare"])
        rows.append((p_best, b_best))
        print(table.row(r, order, gflops(p_best), gflops(p_med), gflops(b_best), gflops(b_med), p_best / b_best))

    return best_and_median(rows, ("probe", "bare"), gflops, TARGET, "target: probe within 10 % of bare")


if __name__ == "__main__":
    sys.exit(main())
