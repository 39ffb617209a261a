"""What the side-by-side benchmarks (``bench_*_vs_*.py``, ``bench_gemm_overhead.py``)
share: the argument parser with ``--rounds`` and its range check, the case spec the
runner would send the worker for one case on this machine's CPU and the worker's
``run_case``, the alternating order of the two sides over rounds, the per-round table
(header and rows), and the closing lines (best and median of rounds, PASS or FAIL
against the target). The scripts run as ``python tests/benchmarks/bench_X.py``, so they
import this module as ``rounds`` (their folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator, Sequence


# -- arguments ---------------------------------------------------------------------------
def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's parser: the first paragraph of its docstring as the description, the
    whole docstring under ``--help``, and ``--rounds`` (every bench's first option)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    return p


def parse_checked(p: argparse.ArgumentParser, message: str, **minimums: int) -> argparse.Namespace:
    """The parsed arguments; a usage error with ``message`` (exit 2) when any option
    named in ``minimums`` is below its minimum."""
    args = p.parse_args()
    if any(getattr(args, name) < least for name, least in minimums.items()):
        p.error(message)
    return args


# -- the probe side ----------------------------------------------------------------------
def local_case(probe: str, params: dict, timing: dict) -> dict:
    """The spec the runner would send the worker for one case of ``probe`` on this
    machine's CPU, with this host's facts."""
    from harness import environment, registry

    from harness.plan import host_facts

    registry.discover()
    env = environment.collect()
    dev = next(d for d in environment.torch_devices() if d["type"] == "cpu")
    return {
        "case_id": registry.case_id(probe, params, dev["id"]),
        "probe": probe,
        "params": params,
        "device": dev["id"],
        "device_info": dev,
        "backend": "torch",
        "host": host_facts(env),
        "seed": 0,
        "timing": timing,
    }


def run_case(spec: dict) -> dict:
    """One case through the worker's own code path, in this process."""
    from harness.execute import run_case

    return run_case(spec)


# -- rounds ------------------------------------------------------------------------------
def orders(rounds: int, first: str, second: str) -> Iterator[tuple[int, tuple[str, str]]]:
    """(round index, the order the two sides run in) for each round. Who goes first
    alternates, so a drift within a round favours neither side."""
    for r in range(rounds):
        yield r, (first, second) if r % 2 == 0 else (second, first)


class RoundTable:
    """The per-round table: ``round``, ``order`` (``order_width`` wide), then the
    ``columns`` as (label, width), right-aligned, two spaces apart."""

    def __init__(self, order_width: int, *columns: tuple[str, int]):
        self.order_width = order_width
        self.columns = columns

    def header(self) -> str:
        return f"{'round':>5}  {'order':<{self.order_width}}  " + "  ".join(
            f"{label:>{width}}" for label, width in self.columns)

    def row(self, r: int, order: Sequence[str], *cells: str | float) -> str:
        """Round ``r`` (0-based) run in ``order``; a cell is a formatted figure, or a
        float (a ratio, milliseconds) printed with three decimals."""
        return f"{r + 1:>5}  {' -> '.join(order):<{self.order_width}}  " + "  ".join(
            f"{cell if isinstance(cell, str) else f'{cell:.3f}':>{width}}"
            for cell, (_, width) in zip(cells, self.columns, strict=True))


def verdict(ratio: float, target: float, which: str, goal: str) -> int:
    """Print PASS or FAIL for ``ratio`` (the ``which`` ratio, e.g. best-of-rounds)
    against ``target``; the exit status: 0 PASS, 1 FAIL."""
    ok = ratio >= target
    print(f"{'PASS' if ok else 'FAIL'}: {which} ratio {ratio:.3f} {'>=' if ok else '<'} {target:.2f} ({goal})")
    return 0 if ok else 1


def best_and_median(rows: list[tuple[float, float]], sides: tuple[str, str], fmt: Callable[[float], str],
                    target: float, goal: str) -> int:
    """The closing lines of a bench whose rounds give one figure per side (higher is
    better): best and median of rounds for each side and their ratio, then the verdict
    on the best-of-rounds ratio (the least-disturbed moment each side saw)."""
    a, b = sides
    best_a, best_b = max(x for x, _ in rows), max(y for _, y in rows)
    med_a, med_b = statistics.median(x for x, _ in rows), statistics.median(y for _, y in rows)
    ratio_best, ratio_med = best_a / best_b, med_a / med_b
    print()
    print(f"best of rounds:   {a} {fmt(best_a)}  {b} {fmt(best_b)}  ratio {a}/{b} {ratio_best:.3f}")
    print(f"median of rounds: {a} {fmt(med_a)}  {b} {fmt(med_b)}  ratio {a}/{b} {ratio_med:.3f}")
    return verdict(ratio_best, target, "best-of-rounds", goal)
