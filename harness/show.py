"""Terminal rendering (rich) of the environment, the probe list and a run."""

from __future__ import annotations

import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table



def _console() -> Console:
    return Console()


def si(value, unit: str) -> str:
    """1.23e11, 'B/s' -> '123 GB/s' (decimal prefixes, as bandwidths and FLOP/s are quoted)."""
    if value is None or value != value:  # None or NaN
        return "—"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def seconds(value) -> str:
    if value is None or value != value:
        return "—"
    for factor, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def _fact(node) -> str:
    if isinstance(node, dict) and "value" in node:
        return "—" if node["value"] is None else str(node["value"])
    return str(node)


def print_environment(doc: dict) -> None:
    console = _console()
    facts = Table(title="environment", show_lines=False)
    facts.add_column("fact")
    facts.add_column("value", overflow="fold")
    facts.add_column("detected by", style="dim", overflow="fold")

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and "value" in node and "source" in node:
            value = node["value"]
            if isinstance(value, dict):  # e.g. ISA flags: show the ones present
                text = ", ".join(k for k, v in value.items() if v is True) or json.dumps(value, default=str)
            else:
                text = _fact(node)
            facts.add_row(prefix, escape(text), escape(str(node["source"])))
            return
        if isinstance(node, dict):
            for key, child in node.items():
                walk(f"{prefix}.{key}" if prefix else key, child)

    for section in ("host", "cpu", "memory", "os", "python", "frameworks"):
        if section in doc:
            walk(section, doc[section])
    nvidia = doc.get("nvidia") or {}
    if nvidia.get("available"):
        for gpu in nvidia.get("gpus", []):
            walk(f"nvidia.gpu{_fact(gpu.get('index', '?'))}", gpu)
    else:
        facts.add_row("nvidia", "not available", escape(str(nvidia.get("reason", ""))))
    console.print(facts)

    devices = Table(title="devices")
    for col in ("backend", "id", "name", "memory"):
        devices.add_column(col)
    for backend, items in (doc.get("devices") or {}).items():
        if isinstance(items, list):
            for d in items:
                devices.add_row(backend, d.get("id", ""), str(d.get("name", "")), si(d.get("memory_bytes"), "B"))
    console.print(devices)

    virt = doc.get("virtualization") or {}
    layers = Table(title=f"virtualization layers: {virt.get('summary', '')}")
    for col in ("layer", "kind", "evidence"):
        layers.add_column(col, overflow="fold")
    for layer in virt.get("layers", []):
        layers.add_row(layer.get("layer", ""), layer.get("kind", ""), escape("\n".join(layer.get("evidence", []))))
    console.print(layers)
    steal = virt.get("steal_time")
    if steal:
        console.print(f"steal time: {json.dumps(steal, default=str)}")
    if doc.get("sysroot"):
        console.print(f"sysroot: {escape(str(doc['sysroot']))} (captured machine: files only, nothing run or measured)")
    _print_nominal(console, doc.get("nominal") or {})


def _print_nominal(console, nominal: dict) -> None:
    """Each device's nominal peaks, the datasheet row or CPU rule behind them, and the
    rule's inputs (cores, clock, FLOP/cycle, vector width): what `run` judges against."""
    if not nominal:
        return
    table = Table(title="nominal peaks (what run judges against)")
    for col in ("device", "from", "inputs", "peak per dtype"):
        table.add_column(col, overflow="fold")
    for dev, n in nominal.items():
        if not isinstance(n, dict):
            continue
        origin = n.get("rule") or n.get("row") or n.get("kind") or "unknown"
        origin = f"{'rule' if n.get('rule') else 'row' if n.get('row') else ''} {origin}".strip()
        if n.get("source"):
            origin += f"\n{n['source']}"
        inputs = []
        if n.get("cores") is not None:
            inputs.append(f"cores {n['cores']}" + (f" ({n['cores_source']})" if n.get("cores_source") else ""))
        if n.get("clock_hz"):
            inputs.append(f"clock {n['clock_hz'] / 1e9:.4g} GHz" + (f" ({n['clock_source']})" if n.get("clock_source") else ""))
        elif n.get("clock_source"):
            inputs.append(f"clock unknown ({n['clock_source']})")
        if n.get("vector_bits"):
            inputs.append(f"vector {n['vector_bits']} bits")
        fpc = n.get("flop_per_cycle") or {}
        if fpc:
            inputs.append("FLOP/cycle/core " + ", ".join(f"{d} {v:g}" for d, v in fpc.items()))
        inputs.extend(str(x) for x in n.get("inputs") or [])  # GPUs: MIG scaling, NVML pair links
        flops = n.get("compute_flops") or {}
        peaks = [f"{d} {si(v, 'FLOP/s')}" for d, v in flops.items()]
        if n.get("memory_Bps"):
            peaks.append(f"memory {si(n['memory_Bps'], 'B/s')}")
        if not peaks:
            peaks.append(f"unknown: {n.get('notes') or ''}"[:300])
        table.add_row(escape(str(dev)), escape(origin), escape("\n".join(inputs)), escape("\n".join(peaks)))
    console.print(table)


def print_probe_list(probes: dict, entries: dict | None, devices: list[dict]) -> None:
    console = _console()
    table = Table(title="probes" + (" (suite grids)" if entries else " (default grids)"), show_lines=True)
    for col in ("probe", "family", "backends", "ranks", "grid", "work per repetition", "devices here"):
        table.add_column(col, overflow="fold")
    for name in sorted(probes):
        cls = probes[name]
        if entries is not None and name not in entries:
            continue
        grid = entries[name].grid if entries else {k: list(p.default) for k, p in cls.params.items()}
        here = [d["id"] for d in devices if d["type"] in cls.device_types]
        work = _work_text(cls, grid, devices)
        table.add_row(
            name,
            cls.family,
            ",".join(cls.backends),
            str(cls.ranks),
            "\n".join(f"{k}: {', '.join(map(str, v))}" for k, v in grid.items()),
            work,
            ", ".join(here) or "none",
        )
    console.print(table)


def _work_text(cls, grid: dict, devices: list[dict]) -> str:
    """The work model of the first grid point, where it doesn't depend on the device."""
    first = {k: v[0] for k, v in grid.items()}
    if "auto" in first.values():
        return "sized on the device (auto)"
    try:
        work = cls().work(first, devices[0] if devices else {"type": "cpu"})
    except Exception:  # noqa: BLE001 - a work model needing the device is described as such
        return "depends on the device"
    parts = [f"at {', '.join(f'{k}={v}' for k, v in first.items())}:"]
    parts.append(f"{si(work.flops, 'FLOP')}, {si(work.bytes, 'B')}")
    if work.bound:
        parts.append(f"{work.bound}-bound")
    return " ".join(parts)


STATUS_STYLE = {"ok": "green", "failed": "red", "timeout": "red", "skipped": "yellow"}


def print_run(manifest: dict, cases) -> None:
    # Here, not at the top: dtype_path reads run files (pandas), which `coherence env`'s
    # print_environment does not need.
    from harness import dtype_path

    console = _console()
    console.print(
        f"[bold]{manifest.get('run_id')}[/]  status {manifest.get('status')}  "
        f"label {manifest.get('label') or '—'}  started {manifest.get('started_at')}  "
        f"finished {manifest.get('finished_at') or '—'}  schema v{manifest.get('schema_version')}"
        # Rounds (harness.runner): the statistics below are pooled over them.
        + (f"  rounds {manifest['rounds']} (statistics pooled)" if (manifest.get("rounds") or 1) > 1 else "")
    )
    env = manifest.get("environment") or {}
    layers = (env.get("virtualization") or {}).get("summary")
    if layers:
        console.print(f"virtualization: {layers}")
    for dev in manifest.get("devices", []):
        nom = dev.get("nominal") or {}
        peaks = ", ".join(f"{k} {si(v, 'FLOP/s')}" for k, v in (nom.get("compute_flops") or {}).items())
        console.print(
            f"device {dev.get('id')}: {dev.get('name')} — nominal ({nom.get('kind', 'unknown')}): "
            f"{peaks or 'compute unknown'}; memory {si(nom.get('memory_Bps'), 'B/s')}"
        )
    table = Table(show_lines=False)
    table.add_column("case", overflow="fold", min_width=24)
    for col in ("status", "n", "p50", "p99", "rate at p50", "best rate", "bound", "roofline", "reason"):
        table.add_column(col, overflow="fold")
    emulated_count = 0
    for row in cases.to_dict(orient="records"):
        rate_p50, best = _rates(row)
        roof = row.get("roofline_fraction")
        # A dtype the CPU has no arithmetic for ran through fp32 (harness.dtype_path):
        # marked on the case, its reason cell says how, its roofline is against fp32.
        emulated = dtype_path.emulated(row)
        emulated_count += bool(emulated)
        table.add_row(
            escape(row["case_id"]) + (f" [magenta]{dtype_path.MARK}[/]" if emulated else ""),
            f"[{STATUS_STYLE.get(row['status'], '')}]{row['status']}[/]",
            "" if row.get("n") is None or row.get("n") != row.get("n") else str(row["n"]),
            seconds(row.get("p50_s")),
            seconds(row.get("p99_s")),
            rate_p50,
            best,
            row["bound"] if isinstance(row.get("bound"), str) else "—",
            "—" if roof is None or roof != roof else f"{roof:.1%}" + (" of fp32" if emulated else ""),
            escape((row.get("reason") or emulated or "")[:160]),
        )
    console.print(table)
    if emulated_count:
        console.print(f"{emulated_count} case(s) {dtype_path.MARK}: a dtype this CPU has no arithmetic for, "
                      "computed through fp32 and judged against the fp32 peak")
    counts = cases["status"].value_counts().to_dict() if len(cases) else {}
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no cases")


def _rates(row: dict) -> tuple[str, str]:
    if row.get("bound") == "compute" or (row.get("flops") and not row.get("bytes")):
        return si(row.get("flops_per_s"), "FLOP/s"), si(row.get("best_flops_per_s"), "FLOP/s")
    if row.get("bytes"):
        return si(row.get("bytes_per_s"), "B/s"), si(row.get("best_bytes_per_s"), "B/s")
    return "—", "—"


VERDICT_STYLE = {"ok": "green", "warn": "yellow", "fail": "red", "info": "cyan", "not measurable": "dim"}


def _value_text(value, unit: str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if unit == "s":
        return seconds(value)
    if unit in ("tokens/s",):
        return si(value, "tok/s")
    return f"{value:.3g}"


def _print_serving(console, entries: list[dict]) -> None:
    """The full-model serving metrics of every composite, one row each."""
    from harness.collector.serving import serving_rows

    if not entries:
        return
    table = Table(title="serving (full model; vLLM benchmark_serving definitions)", show_lines=False)
    for col in ("composite", "layers run/model", "TTFT p50/p99", "TPOT p50/p99", "ITL p50/p99", "E2E p50/p99",
                "req/s", "out tok/s", "goodput req/s", "meets SLO"):
        table.add_column(col, overflow="fold")

    def pair(row, name):
        a, b = row.get(f"{name}_p50_s"), row.get(f"{name}_p99_s")
        return "—" if a is None else f"{seconds(a)} / {seconds(b)}"

    for row in serving_rows(entries):
        slo = row.get("slo_fraction")
        table.add_row(escape(str(row["case_id"])), escape(row["layers"]), pair(row, "ttft"), pair(row, "tpot"),
                      pair(row, "itl"), pair(row, "e2e"), _num(row.get("request_throughput")),
                      _num(row.get("output_throughput")), _num(row.get("goodput")),
                      "—" if slo is None else f"{slo:.0%}")
    console.print(table)


def _num(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def print_indicators(doc: dict) -> None:
    """The capacity headline, the serving composites and the mode 1–4 indicators."""
    from harness.collector import indicator_rows

    console = _console()
    cap = doc.get("capacity") or {}
    if cap.get("C_nom") is not None:
        basis = ", ".join(f"{k}: {v}" for k, v in (cap.get("basis") or {}).items())
        console.print(
            f"[bold]capacity[/] (from {escape(str(cap.get('from_case')))}): C_eff {si(cap.get('C_eff'), 'tok/s')}, "
            f"C_nom {si(cap.get('C_nom'), 'tok/s')}, ε {_value_text(cap.get('epsilon'), None)}  [dim]basis {basis}[/]")
    else:
        console.print(f"[bold]capacity[/]: not measurable — {escape(str(cap.get('reason')))}")
    _print_serving(console, doc.get("serving") or [])
    for entry in doc.get("serving") or []:
        wf = entry.get("waterfall")
        if not wf:
            continue
        parts = " → ".join(f"{b['name']} {seconds(b['seconds']) if b['seconds'] >= 0 else '-' + seconds(-b['seconds'])}"
                           for b in wf["bars"])
        console.print(f"[dim]waterfall {escape(entry['case_id'])} ({wf['unit']}): {escape(parts)} "
                      f"= measured {seconds(wf['measured_mean_s'])}[/]")
    table = Table(title="indicators", show_lines=False)
    for col in ("mode", "indicator", "value", "unit", "verdict", "why / note"):
        table.add_column(col, overflow="fold")
    for row in indicator_rows(doc):
        style = VERDICT_STYLE.get(row["verdict"], "")
        table.add_row(row["mode"], escape(row["name"]), escape(_value_text(row["value"], row["unit"])),
                      escape(str(row["unit"] or "")), f"[{style}]{row['verdict']}[/]", escape(row["reason"][:140]))
    console.print(table)
