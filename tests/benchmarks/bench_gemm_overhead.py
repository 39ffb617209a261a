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

TARGET = 0.90


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--n", type=int, default=2048, help="matrix side (default 2048)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per side per round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="probe timing warmup (default 2; the bare loop does this + 1)")
    args = p.parse_args()
    if args.rounds < 1 or args.reps < 1 or args.n < 1 or args.warmup < 0:
        p.error("--rounds, --reps and --n must be at least 1, --warmup at least 0")
    return args


class ProbeRunner:
    """The gemm.square case through the harness's own worker code path (run_case)."""

    def __init__(self, n: int, warmup: int, reps: int):
        from harness import environment, registry
        from harness.runner import host_facts
        from harness.worker import run_case

        registry.discover()
        env = environment.collect()
        dev = next(d for d in environment.torch_devices() if d["type"] == "cpu")
        self._run_case = run_case
        self.spec = {
            "case_id": f"gemm.square[n={n},dtype=fp32]@{dev['id']}",
            "probe": "gemm.square",
            "params": {"n": n, "dtype": "fp32"},
            "device": dev["id"],
            "device_info": dev,
            "backend": "torch",
            "host": host_facts(env),
            "seed": 0,
            # min_reps = max_reps pins the count, so the budget can't make it differ from
            # the bare loop's.
            "timing": {"warmup": warmup, "warmup_s": 0.0, "min_reps": reps, "max_reps": reps, "budget_s": 1e9},
        }

    def run(self) -> dict:
        res = self._run_case(self.spec)
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
    print(f"{'round':>5}  {'order':<12}  {'probe best':>10}  {'probe med':>9}  {'bare best':>9}  {'bare med':>8}  {'best ratio':>10}")

    rows: list[tuple[float, float]] = []
    for r in range(args.rounds):
        # Alternate who goes first, so a drift within a round favours neither side.
        order = ("probe", "bare") if r % 2 == 0 else ("bare", "probe")
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
        print(f"{r + 1:>5}  {' -> '.join(order):<12}  {gflops(p_best):>10}  {gflops(p_med):>9}  "
              f"{gflops(b_best):>9}  {gflops(b_med):>8}  {p_best / b_best:>10.3f}")

    best_p, best_b = max(p for p, _ in rows), max(b for _, b in rows)
    med_p, med_b = statistics.median(p for p, _ in rows), statistics.median(b for _, b in rows)
    ratio_best, ratio_med = best_p / best_b, med_p / med_b
    print()
    print(f"best of rounds:   probe {gflops(best_p)}  bare {gflops(best_b)}  ratio probe/bare {ratio_best:.3f}")
    print(f"median of rounds: probe {gflops(med_p)}  bare {gflops(med_b)}  ratio probe/bare {ratio_med:.3f}")
    verdict = "PASS" if ratio_best >= TARGET else "FAIL"
    print(f"{verdict}: best-of-rounds ratio {ratio_best:.3f} {'>=' if verdict == 'PASS' else '<'} {TARGET:.2f} (target: probe within 10 % of bare)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
