#!/usr/bin/env python3
"""Side-by-side: the collective.all_reduce probe (through the harness's own rank pool
and worker code path) against a plain torch.distributed all_reduce loop, 16 MiB fp32,
world size 2, Gloo on 127.0.0.1.

The question it answers: does the harness (rank pool, agreed repetition counts, the
clock wrapper) report the bus bandwidth a bare loop gets? The probe gives two figures
per case (issue 19): ``busbw_Bps``, the p50 of barriered repetitions timed at the
slowest rank (tails kept; before issue 19 the only one, 0.87-0.93 of the plain loop),
and ``busbw_b2b_Bps``, nccl-tests' back-to-back figure (k iterations after one
barrier, time / k, averaged over ranks: ``probes.collective.back_to_back``). Target:
the back-to-back figure at least 0.95 of the plain loop's (median-of-rounds ratio);
the per-repetition figure is printed beside it for reference.

- probe: ``harness.ranks.RankPool`` (two spawned rank processes in one Gloo group,
  one thread each, as the harness starts them) runs the case spec the runner would
  send; per repetition the slowest rank's duration (``harness.ranks.combine``);
  busbw = size / median × 2(n−1)/n, as ``harness.runner.case_row`` computes it; and the
  back-to-back figure size / ``extra["b2b"]["time_s"]`` × 2(n−1)/n (``busbw_b2b_Bps``).
- plain: two processes started with torch.multiprocessing, ``init_process_group("gloo",
  tcp://127.0.0.1:<free port>)``, the same thread count, a fresh random buffer per
  round, warm-up, one barrier, then every ``dist.all_reduce`` timed with
  ``time.perf_counter`` back to back; per repetition the slowest rank, median.

On a noisy shared VM bandwidth drifts, so the two sides run in alternating order for
several rounds; each round prints both medians; the verdict is on the ratio of the
medians over rounds.

Run from the repository root:  python tests/benchmarks/bench_allreduce_vs_plain.py
Exit status: 0 PASS, 1 FAIL or error, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from rounds import RoundTable, arg_parser, orders, parse_checked, verdict

TARGET = 0.95  # back-to-back figure / plain loop
WORLD = 2


def parse_args() -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--size-bytes", type=int, default=16 * 2**20, help="all_reduce buffer (default 16 MiB)")
    p.add_argument("--reps", type=int, default=30, help="timed all_reduces per side per round (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed all_reduces per side per round (default 3)")
    return parse_checked(p, "--rounds and --reps must be at least 1, --warmup at least 0, --size-bytes at least 4",
                         rounds=1, reps=1, warmup=0, size_bytes=4)


def _threads() -> int:
    """What harness.ranks gives each CPU rank: the usable cores split between ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // WORLD)


# -- plain side ------------------------------------------------------------------------
def plain_rank(rank: int, port: int, conn, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        numel, warmup, reps, seed = cmd
        gen = torch.Generator().manual_seed(seed * WORLD + rank)
        x = torch.rand(numel, generator=gen) + 0.5  # grows ×2 per call: 2^(warmup+reps) stays finite
        for _ in range(warmup):
            dist.all_reduce(x)
        dist.barrier()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        conn.send((times, bool(torch.isfinite(x).all())))
    dist.destroy_process_group()


class Plain:
    def __init__(self):
        import torch.multiprocessing as mp

        from harness.ranks import free_port

        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        for rank in range(WORLD):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=plain_rank, args=(rank, port, child, _threads()), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(180) or conn.recv() != "ready":
                raise RuntimeError("plain ranks did not start")

    def run(self, numel: int, warmup: int, reps: int, seed: int) -> tuple[list[float], float]:
        """(the slowest rank per rep; the loop's mean per iteration, averaged over ranks:
        the plain loop's figure computed the way nccl-tests computes its own)."""
        for conn in self.conns:
            conn.send((numel, warmup, reps, seed))
        answers = [conn.recv() for conn in self.conns]
        if not all(finite for _, finite in answers):
            raise RuntimeError("plain all_reduce produced non-finite values")
        mean = statistics.mean(sum(t) / len(t) for t, _ in answers)
        return [max(t[i] for t, _ in answers) for i in range(reps)], mean

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)


# -- probe side ------------------------------------------------------------------------
class Probe:
    """collective.all_reduce through harness.ranks.RankPool, the way the worker runs a
    multi-rank case (harness.worker.run_multi_rank)."""

    def __init__(self, size_bytes: int, warmup: int, reps: int):
        from harness import environment, registry
        from harness.ranks import RankPool

        registry.discover()
        dev = next(d for d in environment.torch_devices() if d["type"] == "cpu")
        params = {"size_bytes": size_bytes, "dtype": "fp32", "world_size": WORLD}
        self.work = registry.get("collective.all_reduce")().work(params, dev)
        self.spec = {
            "case_id": registry.case_id("collective.all_reduce", params, f"cpu:0-{WORLD - 1}"),
            "probe": "collective.all_reduce",
            "params": params,
            "device": "cpu:0",
            "device_info": dev,
            "world_size": WORLD,
            "group_devices": ["cpu:0"] * WORLD,
            "backend": "torch",
            "host": {},
            "seed": 0,
            # min_reps = max_reps pins the count to the plain loop's.
            "timing": {"warmup": warmup, "warmup_s": 0.0, "min_reps": reps, "max_reps": reps, "budget_s": 1e9},
        }
        self.pool = RankPool(["cpu:0"] * WORLD, 120.0, [])
        failure = self.pool.start()
        if failure:
            raise RuntimeError(failure)

    def run(self) -> tuple[list[float], float]:
        """(per-repetition durations, slowest rank each; back-to-back seconds per iteration)."""
        from harness.ranks import combine

        res = combine(self.pool.run(self.spec), WORLD)
        if res["status"] != "ok":
            raise RuntimeError(f"probe case {res['status']}: {res.get('reason')}")
        b2b = (res.get("extra") or {}).get("b2b") or {}
        if not b2b.get("time_s"):
            raise RuntimeError("the probe timed no back-to-back loop (extra['b2b'] missing)")
        return res["durations_s"], float(b2b["time_s"])

    def close(self) -> None:
        self.pool.close()


def gbps(x: float) -> str:
    return f"{x / 1e9:8.3f}"


def main() -> int:
    args = parse_args()

    import torch

    from harness.stats import summarize
    from probes.collective import busbw_factor, resolve_size

    size = resolve_size("all_reduce", args.size_bytes, WORLD, 4)
    factor = busbw_factor("all_reduce", WORLD)
    probe = Probe(size, args.warmup, args.reps)
    plain = Plain()
    if probe.work.collective["size_bytes"] != size or probe.work.collective["busbw_factor"] != factor:
        print(f"ERROR: probe work model {probe.work.collective} differs from size {size}, factor {factor}", file=sys.stderr)
        return 1

    print(f"all_reduce {size / 2**20:g} MiB fp32, world size {WORLD}, Gloo on 127.0.0.1, "
          f"{_threads()} thread(s) per rank, busbw factor {factor:g}")
    print(f"torch {torch.__version__}; per side per round: {args.warmup} untimed (+1 for the probe's check), "
          f"{args.reps} timed; plain and per-rep: the slowest rank per rep, busbw at the median; b2b: "
          f"{args.reps} back to back, mean over iterations and ranks; GB/s (1e9 B/s)")
    print()
    table = RoundTable(14, ("per-rep busbw", 13), ("b2b ms", 8), ("b2b busbw", 9), ("plain p50 ms", 12),
                       ("plain busbw", 11), ("plain mean", 10), ("b2b/plain", 9), ("b2b/mean", 8), ("rep/plain", 9))
    print(table.header())
    rows = []
    try:
        for r, order in orders(args.rounds, "probe", "plain"):
            got = {}
            for side in order:
                if side == "probe":
                    got["rep"], b2b_s = probe.run()
                else:
                    got["plain"], plain_mean_s = plain.run(size // 4, args.warmup + 1, args.reps, seed=r)
            # The harness's median (numpy percentile 50), for both sides.
            p50 = {k: summarize(v)["p50_s"] for k, v in got.items()}
            bw = {k: size / v * factor for k, v in p50.items()}
            bw["probe"] = size / b2b_s * factor
            bw["plain_mean"] = size / plain_mean_s * factor
            rows.append(bw)
            print(table.row(r, order, gbps(bw["rep"]), b2b_s * 1e3, gbps(bw["probe"]), p50["plain"] * 1e3,
                            gbps(bw["plain"]), gbps(bw["plain_mean"]), bw["probe"] / bw["plain"],
                            bw["probe"] / bw["plain_mean"], bw["rep"] / bw["plain"]))
    except RuntimeError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        probe.close()
        plain.close()

    med_p = statistics.median(b["probe"] for b in rows)
    med_b = statistics.median(b["plain"] for b in rows)
    best_p = max(b["probe"] for b in rows)
    best_b = max(b["plain"] for b in rows)
    med_r = statistics.median(b["rep"] for b in rows)
    med_m = statistics.median(b["plain_mean"] for b in rows)
    ratio = med_p / med_b
    print()
    print(f"median of rounds: b2b {gbps(med_p)}  plain {gbps(med_b)}  ratio b2b/plain {ratio:.3f}  "
          f"(per-rep busbw {gbps(med_r)}, ratio {med_r / med_b:.3f})")
    print(f"                  plain loop's mean {gbps(med_m)}  ratio b2b/plain mean {med_p / med_m:.3f} "
          "(same statistic on both sides)")
    print(f"best of rounds:   b2b {gbps(best_p)}  plain {gbps(best_b)}  ratio b2b/plain {best_p / best_b:.3f}")
    return verdict(ratio, TARGET, "median-of-rounds",
                   f"target: the back-to-back busbw at least {TARGET:.2f} of the plain loop")


if __name__ == "__main__":
    sys.exit(main())
