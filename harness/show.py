"""Terminal rendering of the environment, the probe list, a run and its indicators.

Everything fits the terminal's width (:func:`width`: $COLUMNS, else 80 when piped): the
environment and probe list through rich tables folded to that width, a run through plain
fixed-width tables (:func:`text_table`), one per probe family, whose case ids shrink to
the parameters that vary and whose reasons go to numbered footnotes.
"""

from __future__ import annotations

import json

from rich.console import Console

from harness import registry



def width() -> int:
    """The terminal's width in columns: $COLUMNS, else the terminal's own, else 80
    (piped output), never below 40 (shutil.get_terminal_size's order)."""
    import shutil

    return max(40, shutil.get_terminal_size((80, 24)).columns)


def _console() -> Console:
    # An explicit width: rich would otherwise read the terminal of stdout only.
    return Console(width=width())


def si(value, unit: str) -> str:
    """1.23e11, 'B/s' -> '123 GB/s': :func:`harness.units.fmt` (kept for callers of this name)."""
    from harness.units import fmt

    return fmt(value, unit)


def seconds(value) -> str:
    """2.5e-4 -> '250 µs': :func:`harness.units.fmt` in seconds (kept for callers of this name)."""
    from harness.units import fmt

    return fmt(value, "s")


def _fact(node) -> str:
    if isinstance(node, dict) and "value" in node:
        return "—" if node["value"] is None else str(node["value"])
    return str(node)


def wrap_table(headers: list[str], rows: list[list[str]], title: str | None = None,
               total: int | None = None) -> list[str]:
    """Lines of a plain ASCII table no wider than ``total`` (default :func:`width`) whose
    cells wrap inside their column instead of being cut (for `env` and `list`, where
    every character of a value matters). Columns keep their natural width while the
    table fits; otherwise the widest give way, none below 8 characters. A cell's own
    newlines start new lines inside it."""
    import textwrap

    total = total or width()
    headers = [_ascii(h) for h in headers]
    rows = [[_ascii(c) for c in r] for r in rows]
    n = len(headers)
    natural = [max([len(headers[i])] + [len(part) for r in rows for part in r[i].split("\n")]) for i in range(n)]
    widths = list(natural)
    room = total - (n - 1) * 2
    # The first column names the row (a fact, a probe): up to a third of the width, and
    # beyond that it gives way last.
    longest0 = max([len(w) for r in [headers] + rows for part in r[0].split("\n") for w in part.split()] or [1])
    if sum(widths) > room:
        # A name (a fact, a probe) stays whole up to 40 characters when the others can give.
        widths[0] = min(widths[0], max(8, total // 3, min(longest0, 40)))
    # First the columns with room above their longest word give way (up to 24
    # characters a word), so "model=llama-3.1-8b," or "128x6144x4096" stay whole where
    # the table allows it; only then does any column go down to 8.
    longest = [max([len(w) for r in [headers] + rows for part in r[i].split("\n") for w in part.split()] or [1])
               for i in range(n)]
    floor = [min(max(8, t), 24) for t in longest]
    while sum(widths) > room:
        give = [i for i in range(1, n) if widths[i] > floor[i]]
        if not give:
            break
        i = max(give, key=lambda j: widths[j])  # the widest gives way first, as below
        widths[i] -= 1
    while sum(widths) > room and max(widths[1:] or [0]) > 8:
        i = 1 + widths[1:].index(max(widths[1:]))
        widths[i] -= 1
    while sum(widths) > room and widths[0] > 8:
        widths[0] -= 1

    def cell_lines(text: str, w: int) -> list[str]:
        out = []
        for part in text.split("\n"):
            out.extend(textwrap.wrap(part, width=w, break_long_words=True, break_on_hyphens=False) or [""])
        return out

    lines = [_ascii(title)] if title else []
    for r in [headers] + rows:
        cells = [cell_lines(c, widths[i]) for i, c in enumerate(r)]
        for k in range(max(len(c) for c in cells)):
            lines.append(_cut("  ".join((c[k] if k < len(c) else "").ljust(widths[i])
                                        for i, c in enumerate(cells)).rstrip(), total))
    return lines


def print_environment(doc: dict) -> None:
    """`coherence env`: every fact with the file or call it was detected by, the
    devices, the virtualization layers and the nominal peaks; fitted to the terminal."""
    facts = []

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and "value" in node and "source" in node:
            value = node["value"]
            if isinstance(value, dict):  # e.g. ISA flags: show the ones present
                text = ", ".join(k for k, v in value.items() if v is True) or json.dumps(value, default=str)
            elif isinstance(value, list):
                text = " ".join(map(str, value))
            else:
                text = _fact(node)
            facts.append([prefix, text, str(node["source"])])
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
        facts.append(["nvidia", "not available", str(nvidia.get("reason", ""))])
    out = wrap_table(["fact", "value", "detected by"], facts, title="environment")

    devices = []
    for backend, items in (doc.get("devices") or {}).items():
        if isinstance(items, list):
            for d in items:
                devices.append([backend, str(d.get("id", "")), str(d.get("name", "")), si(d.get("memory_bytes"), "B")])
    out += [""] + wrap_table(["backend", "id", "name", "memory"], devices, title="devices")

    virt = doc.get("virtualization") or {}
    layers = [[str(x.get("layer", "")), str(x.get("kind", "")), "\n".join(x.get("evidence", []))]
              for x in virt.get("layers", [])]
    out += [""] + wrap_table(["layer", "kind", "evidence"], layers,
                             title=f"virtualization layers: {virt.get('summary', '')}")
    steal = virt.get("steal_time")
    if steal:
        out += _wrap(f"steal time: {json.dumps(steal, default=str)}")
    if doc.get("sysroot"):
        out += _wrap(f"sysroot: {doc['sysroot']} (captured machine: files only, nothing run or measured)")
    out += _nominal_lines(doc.get("nominal") or {})
    _emit(out)


def _nominal_lines(nominal: dict) -> list[str]:
    """Each device's nominal peaks, the datasheet row or CPU rule behind them, and the
    rule's inputs (cores, clock, FLOP/cycle, vector width): what `run` judges against."""
    if not nominal:
        return []
    rows = []
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
        rows.append([str(dev), origin, "\n".join(inputs), "\n".join(peaks)])
    return [""] + wrap_table(["device", "from", "inputs", "peak per dtype"], rows,
                             title="nominal peaks (what run judges against)")


def devices_here(cls, devices: list[dict]) -> list[str]:
    """The ids of ``devices`` a probe would plan on: a device of a backend with a kernel
    for it, of a type that kernel runs on (harness.plan.device_types)."""
    from harness.plan import device_types

    return [d["id"] for d in devices if d["type"] in device_types(cls, d.get("backend", "torch"))]


def print_probe_list(probes: dict, entries: dict | None, devices: list[dict]) -> None:
    """`coherence list`: each probe with its family, backends, ranks, grid, work per
    repetition and the devices here it would run on; fitted to the terminal."""
    rows = []
    for name in sorted(probes):
        cls = probes[name]
        if entries is not None and name not in entries:
            continue
        grid = entries[name].grid if entries else {k: list(p.default) for k, p in cls.params.items()}
        names = registry.backends_of(cls)
        here = devices_here(cls, devices)
        # One backend a line: a cell wraps at its line ends, never inside a name.
        rows.append([name, "\n".join(names), str(cls.ranks),
                     "\n".join(f"{k}: {', '.join(_size_text(x) if k == 'size_bytes' else str(x) for x in v)}"
                               for k, v in grid.items()),
                     _work_text(cls, grid, devices), "\n".join(here) or "none"])
    _emit(wrap_table(["probe", "backends", "ranks", "grid", "work per repetition", "here"], rows,
                     title="probes" + (" (suite grids)" if entries else " (default grids)")))


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


# -- plain fixed-width tables ------------------------------------------------------------

# The run tables are plain ASCII: a line of N characters is then N bytes, so byte-counting
# tools (mawk's length, cut -c) agree with the terminal about what fits.
_ASCII = {"—": "-", "–": "-", "─": "-", "·": "|", "→": "->", "…": "~", "µ": "u", "ε": "eps", "κ": "kappa",
          "×": "x", "≥": ">=", "≤": "<=", "≈": "~", "²": "^2", "÷": "/", "’": "'", "“": '"', "”": '"', "→ ": "-> "}


def _ascii(text) -> str:
    text = str(text)
    if text.isascii():
        return text
    for a, b in _ASCII.items():
        text = text.replace(a, b)
    return text.encode("ascii", "replace").decode("ascii")


def _cut(text: str, n: int) -> str:
    text = str(text)
    return text if len(text) <= n else (text[: max(0, n - 1)] + "~" if n > 0 else "")


def text_table(headers: list[str], rows: list[list[str]], *, right: set[int] | None = None, flex: int = 0,
               total: int | None = None, groups: dict[int, str] | None = None,
               top: list[tuple[int, int, str]] | None = None) -> list[str]:
    """Lines of a plain table no wider than ``total`` columns (default :func:`width`).

    ``headers`` and each row are cell texts; columns in ``right`` are right-aligned (numbers);
    column ``flex`` (the case label) takes what the others leave and is cut with '…'.
    ``groups`` maps a row index to a line printed above that row (a group heading);
    ``top`` is a header line above the headers: (first column, last column, text) spans,
    centred over those columns (e.g. the dtype over its p50 / rate / roofline columns).
    Raises nothing; a table wider than ``total`` even with an empty flex column is cut."""
    total = total or width()
    right = right or set()
    headers = [_ascii(h) for h in headers]
    rows = [[_ascii(c) for c in r] for r in rows]
    groups = {k: _ascii(v) for k, v in (groups or {}).items()}
    top = [(a, b, _ascii(t)) for a, b, t in top or []]
    n = len(headers)
    widths = [max([len(headers[i])] + [len(r[i]) for r in rows]) for i in range(n)]
    fixed = sum(w for i, w in enumerate(widths) if i != flex) + (n - 1)
    widths[flex] = max(4, min(widths[flex], total - fixed))

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            c = _cut(c, widths[i])
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return _cut(" ".join(out).rstrip(), total)

    lines = []
    if top:
        starts = [sum(widths[:i]) + i for i in range(n)]
        buf = [" "] * (sum(widths) + n)
        for a, b, text in top:
            lo, hi = starts[a], starts[b] + widths[b]
            text = _cut(text, hi - lo)
            pad = lo + (hi - lo - len(text)) // 2
            buf[pad:pad + len(text)] = list(text)
        lines.append(_cut("".join(buf).rstrip(), total))
    lines.append(line(headers))
    for i, r in enumerate(rows):
        if groups and i in groups:
            lines.append(_cut(groups[i], total))
        lines.append(line(r))
    return lines


def _wrap(text: str, indent: str = "  ") -> list[str]:
    import textwrap

    return textwrap.wrap(_ascii(text), width=width(), subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False) or [""]


def _emit(lines: list[str]) -> None:
    import click

    for ln in lines:
        click.echo(ln)


# -- the verdict --------------------------------------------------------------------------


def headline_text(summary: dict) -> list[str]:
    """The verdict summary (harness.headline) wrapped to the terminal's width."""
    from harness.headline import headline_lines

    out = []
    for i, ln in enumerate(headline_lines(summary)):
        out.extend(_wrap(ln, "     " if i else "  "))
    return out


def print_headline(summary: dict) -> None:
    """Print the verdict summary: overall PASS / WARN / FAIL, counts, largest findings."""
    _emit(headline_text(summary))


# -- a run ----------------------------------------------------------------------------------

STATUS_TEXT = {"ok": "ok", "failed": "FAIL", "timeout": "T/O", "skipped": "skip", "interrupted": "INT"}
# Parameters whose value names itself (a dtype, a layout): shown without their key.
BARE_KEYS = {"dtype", "mnk", "layout", "proj", "model", "memory", "path", "arrival", "op", "mode", "kind", "kv_layout"}
SHORT_KEYS = {"batch": "b", "world_size": "ws", "size_bytes": "", "size_mib": "MiB", "layers": "L", "prompt": "in",
              "tokens": "out", "reads": "reads", "rate": "rate"}
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int32": 4}
# Families whose cases are judged by bandwidth; the others by FLOP/s (their work model).
RATE_OF = {"gemm": "flops", "prefill": "flops"}


def _params(row: dict) -> dict:
    """The case's parameters: its ``params`` column, else parsed from its case id
    (``probe[k=v,...]@device``, for rows written without the column)."""
    import re

    from harness.results import json_object

    p = json_object(row.get("params"))
    if p or row.get("params") not in (None, ""):
        return p
    m = re.search(r"\[([^\]]*)\]", str(row.get("case_id") or ""))
    return dict(kv.split("=", 1) for kv in m.group(1).split(",") if "=" in kv) if m else {}


def _size_text(v) -> str:
    """Bytes as a short size: binary prefixes where the size is a whole number of them
    (4096 -> 4K, 64 MiB -> 64M, as nccl-tests' -b/-e arguments read), else the number."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    v = int(v)
    for factor, p in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if v >= factor and v % factor == 0:
            return f"{v // factor}{p}"
    return str(v)


def _param_text(key: str, value) -> str:
    if key == "size_bytes":
        return _size_text(value)
    if key == "graph" and str(value).lower() in ("true", "false"):
        # The composites' CUDA-graph parameter: what was asked, in one word (whether it
        # was applied is the row's footnote).
        return "graph" if str(value).lower() == "true" else "eager"
    if key in BARE_KEYS:
        return str(value)
    short = SHORT_KEYS.get(key, key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{short}={value}" if short else str(value)


def short_labels(rows: list[dict], family: str, drop: tuple = (), devices: bool = True) -> list[str]:
    """Each case's label within its family table: the probe without the family prefix and
    only the parameters whose values differ between that probe's cases (minus ``drop``),
    then the device where the table holds more than one (and ``devices``)."""
    by_probe: dict[str, list[dict]] = {}
    for r in rows:
        by_probe.setdefault(str(r.get("probe")), []).append(r)
    varying: dict[str, list[str]] = {}
    for probe, rs in by_probe.items():
        keys: list[str] = []
        for r in rs:
            keys.extend(k for k in _params(r) if k not in keys)
        varying[probe] = [k for k in keys if k not in drop
                          and len({json.dumps(_params(r).get(k), default=str) for r in rs}) > 1]
    device_ids = {str(r.get("device")) for r in rows}
    out = []
    for r in rows:
        probe = str(r.get("probe"))
        name = probe[len(family) + 1:] if probe.startswith(family + ".") else probe
        p = _params(r)
        parts = [name] + [_param_text(k, p[k]) for k in varying[probe] if k in p]
        if len(device_ids) > 1 and devices:
            parts.append(f"@{r.get('device')}")
        out.append(" ".join(parts))
    return out


class Footnotes:
    """Numbered footnotes, one per distinct text: ``ref(text)`` -> '1'."""

    def __init__(self) -> None:
        self.texts: dict[str, int] = {}

    def ref(self, text: str) -> str:
        text = " ".join(str(text).split())
        if text not in self.texts:
            self.texts[text] = len(self.texts) + 1
        return str(self.texts[text])

    def refs(self, texts) -> str:
        return ",".join(self.ref(t) for t in texts if t)

    def lines(self) -> list[str]:
        out = []
        for text, n in self.texts.items():
            out.extend(_wrap(f"[{n}] {text[:400]}", "    "))
        return out


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _graph_note(row: dict) -> str | None:
    """The footnote of a composite that asked for CUDA graphs and ran eagerly
    (``extra.graph`` = {requested, applied, collectives, reason}, probes/composite.py):
    its κ row would otherwise read as graphed. None where no graph was requested, where
    it was applied, and for rows without ``extra.graph`` (older runs, other families)."""
    from harness.results import json_object

    g = json_object(row.get("extra")).get("graph")
    if not isinstance(g, dict) or not g.get("requested") or g.get("applied"):
        return None
    return f"graph requested, not applied (ran eagerly): {g.get('reason') or 'no reason recorded'}"


def _notes(row: dict, over: dict, emulated) -> list[str]:
    notes = []
    if row.get("reason"):  # the status is in its own column: one footnote per distinct reason
        notes.append(str(row["reason"]).splitlines()[0])
    if emulated:
        notes.append(f"{emulated}")
    graph = _graph_note(row)
    if graph:
        notes.append(graph)
    o = over.get(str(row.get("case_id")))
    if o:
        notes.append(f"not judged: {o['ranks']} CPU ranks on {o['usable_cores']:g} usable cores "
                     "(oversubscribed; the harness's setup, not the interconnect)")
    return notes


def _roof(row: dict) -> str:
    """Share of the roofline with its bound's initial; '*' where the dtype ran emulated
    through fp32 and is judged against the fp32 peak (harness.dtype_path; its footnote
    says how)."""
    from harness import dtype_path

    roof = _num(row.get("roofline_fraction"))
    if roof is None:
        return "—"
    bound = row.get("bound") if isinstance(row.get("bound"), str) else ""
    mark = "*" if dtype_path.emulated(row) else ""
    return (f"{roof * 100:.0f}%" if roof >= 0.01 else f"{roof * 100:.1f}%") + bound[:1] + mark


def _times(rows: list[dict]) -> tuple[list[str], list[str], str]:
    """p50 and p99 of the rows on one scale (one unit for both columns)."""
    from harness.units import column

    both, unit = column([_num(r.get("p50_s")) for r in rows] + [_num(r.get("p99_s")) for r in rows], "s")
    return both[:len(rows)], both[len(rows):], unit


def _dtype_rank(dt) -> tuple:
    order = list(DTYPE_BYTES)
    return (order.index(dt) if dt in order else len(order), str(dt))


def _family_table(family: str, rows: list[dict], notes: Footnotes, over: dict) -> list[str]:
    """One family's cases: label, status, p50, p99, rate (one unit for the column), share
    of the roofline with its bound (c compute, m memory, l link), footnote numbers. With
    several dtypes and room, one row per case without its dtype and the dtypes side by side."""
    from harness import dtype_path
    from harness.units import column

    labels0 = short_labels(rows, family, drop=("dtype",))
    order = sorted(range(len(rows)), key=lambda i: (str(rows[i].get("probe")), labels0[i], _dtype_rank(rows[i].get("dtype"))))
    rows = [rows[i] for i in order]
    kind = RATE_OF.get(family, "bytes")
    rate_col, rate_unit = (("flops_per_s", "FLOP/s") if kind == "flops" else ("bytes_per_s", "B/s"))
    dtypes = sorted({str(r.get("dtype")) for r in rows if isinstance(r.get("dtype"), str)}, key=_dtype_rank)
    p50, p99, t_unit = _times(rows)
    t99_unit = t_unit
    rates, r_unit = column([_num(r.get(rate_col)) for r in rows], rate_unit)
    refs = [notes.refs(_notes(r, over, dtype_path.emulated(r))) for r in rows]
    if len(dtypes) > 1:
        pivot = _pivot(family, rows, dtypes, p50, rates, refs, t_unit, r_unit)
        if pivot is not None:
            return pivot
    labels = short_labels(rows, family)
    cols = [(family, labels, False), ("st", [STATUS_TEXT.get(r.get("status"), str(r.get("status"))) for r in rows], False),
            (f"p50 {t_unit}", p50, True), (f"p99 {t99_unit}", p99, True), (r_unit, rates, True),
            ("roof", [_roof(r) for r in rows], True), ("fn", refs, False)]
    # A column with nothing in it (no roofline for overhead probes) takes no room.
    cols = [c for i, c in enumerate(cols) if i == 0 or any(x not in ("", "—") for x in c[1])]
    body = [[c[1][i] for c in cols] for i in range(len(rows))]
    return text_table([c[0] for c in cols], body, right={i for i, c in enumerate(cols) if c[2]})


def _composite_table(rows: list[dict], notes: Footnotes, over: dict, serving: list[dict]) -> list[str]:
    """The composites: label, status, p50, p99 of a step or request, its effective
    capacity C_eff (tokens/s meeting the SLO) and coherence ratio kappa with its verdict
    (INDICATORS.md section 2), from indicators.json's serving entries."""
    from harness import dtype_path
    from harness.units import column

    by_case = {e.get("case_id"): e for e in serving if isinstance(e, dict)}
    labels = short_labels(rows, "composite")
    order = sorted(range(len(rows)), key=lambda i: labels[i])
    rows, labels = [rows[i] for i in order], [labels[i] for i in order]
    # The service times kappa = T_pred / T_meas is made of (the report's "T_meas"), where
    # the serving entry has them; the repetition times otherwise.
    timed = [{"p50_s": (by_case.get(r.get("case_id")) or {}).get("T_meas_p50_s", r.get("p50_s")),
              "p99_s": (by_case.get(r.get("case_id")) or {}).get("T_meas_p99_s", r.get("p99_s"))} for r in rows]
    p50, p99, t_unit = _times(timed)
    t99_unit = t_unit
    pred, pred_unit = column([_num((by_case.get(r.get("case_id")) or {}).get("T_pred_s")) for r in rows], "s")

    def ind(r, key):
        v = (by_case.get(r.get("case_id")) or {}).get(key)
        return v if isinstance(v, dict) else {}

    c_eff = [_num(ind(r, "C_eff").get("value")) for r in rows]
    c_eff_text, c_unit = column(c_eff, "tok/s")
    kappa = []
    for r in rows:
        k = ind(r, "kappa")
        v = _num(k.get("value"))
        verdict = "not judged" if k.get("not_judged") else str(k.get("verdict") or "")
        kappa.append("-" if v is None else f"{v:.3g} {verdict}".strip())
    # J/token (full model, indicators.json serving[].j_per_token): '-' where not measured,
    # its reason a footnote (one per distinct reason). Indicators written before energy
    # accounting have no such entry: then no column at all.
    energy = any(ind(r, "j_per_token") for r in rows)
    jpt_text, j_unit = column([_num(ind(r, "j_per_token").get("value")) for r in rows], "J")
    refs = []
    for r in rows:
        texts = _notes(r, over, dtype_path.emulated(r))
        jpt = ind(r, "j_per_token")
        if energy and r.get("status") == "ok" and _num(jpt.get("value")) is None:
            texts.append(f"J/token not measured: {jpt.get('reason') or 'no energy figure in indicators.json'}")
        refs.append(notes.refs(texts))
    body = [[labels[i], STATUS_TEXT.get(r.get("status"), str(r.get("status"))), pred[i], p50[i], p99[i],
             c_eff_text[i]] + ([jpt_text[i]] if energy else []) + [kappa[i], refs[i]] for i, r in enumerate(rows)]
    # T_meas is the p50 service time (the p99 beside it), as in the report's serving table.
    # One time unit over T_pred, T_meas and p99 where they share it: the unit goes to a
    # line above them, leaving the case label room for what tells the rows apart.
    shared = pred_unit == t_unit
    headers = (["composite", "st", "T_pred", "T_meas", "p99"] if shared else
               ["composite", "st", f"T_pred {pred_unit}", f"T_meas {t_unit}", f"p99 {t99_unit}"])
    headers += [f"C_eff {c_unit}"] + ([f"{j_unit}/tok"] if energy else [])
    return text_table(headers + ["kappa", "fn"], body, right=set(range(2, 7 if energy else 6)),
                      top=[(2, 4, f"-- {t_unit} --")] if shared else None)


def _pivot(family, rows, dtypes, p50, rates, refs, t_unit, r_unit) -> list[str] | None:
    labels = short_labels(rows, family, drop=("dtype",))
    keyed: dict[str, dict[str, int]] = {}
    for i, r in enumerate(rows):
        slot = keyed.setdefault(labels[i] + f"\0{r.get('device')}", {})
        if str(r.get("dtype")) in slot:
            return None  # two cases would share a cell: one row per case instead
        slot[str(r.get("dtype"))] = i
    if len(keyed) > 0.75 * len(rows):
        return None  # the dtypes seldom share a case: side by side would save no lines
    body = []
    for key, by_dt in keyed.items():
        cells = [key.split("\0")[0]]
        note = []
        for dt in dtypes:
            i = by_dt.get(dt)
            if i is None:
                cells += ["", "", ""]
                continue
            st = rows[i].get("status")
            cells += [p50[i] if st == "ok" else STATUS_TEXT.get(st, str(st)), rates[i], _roof(rows[i])]
            if refs[i]:
                note.append(refs[i])
        cells.append(",".join(dict.fromkeys(",".join(note).split(","))) if note else "")
        body.append(cells)
    headers = [family]
    for _ in dtypes:
        headers += [f"p50 {t_unit}", r_unit, "roof"]
    headers.append("fn")
    right = {i for i in range(1, len(headers) - 1)}
    top = [(1 + 3 * j, 3 + 3 * j, f"-- {dt} --") for j, dt in enumerate(dtypes)]
    lines = text_table(headers, body, right=right, top=top)
    fixed = sum(max(len(h), max((len(b[i]) for b in body), default=0)) for i, h in enumerate(headers) if i) + len(headers)
    if width() - fixed < 14:  # no room left for the label: one row per case instead
        return None
    return lines


REDOP = {"all_reduce": "sum", "reduce": "sum", "reduce_scatter": "sum"}


def _natural_width(headers: list[str], rows: list[list[str]]) -> int:
    n = len(headers)
    return sum(max([len(_ascii(headers[i]))] + [len(_ascii(r[i])) for r in rows]) for i in range(n)) + n - 1


def _collective_table(rows: list[dict], notes: Footnotes, over: dict) -> list[str]:
    """Collectives in nccl-tests' columns (size, count, type, redop, root, time, algbw,
    busbw, #wrong; https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md),
    each operation headed by its 'Avg bus bandwidth' per world size (the mean busbw over
    its sizes, as nccl-tests prints it). Where the width allows, the world sizes stand
    side by side the way nccl-tests sets out-of-place beside in-place; otherwise one
    group of rows per operation and world size."""
    from harness.results import json_object
    from harness.units import column, fmt

    def op_of(r):
        return str(r.get("collective_op") or str(r.get("probe")).split(".", 1)[-1])

    def ws_of(r):
        w = _num(r.get("world_size")) or _num(_params(r).get("world_size"))
        return int(w) if w else len(str(r.get("device")).split("+"))

    def size_of(r):
        return _num(_params(r).get("size_bytes")) or _num(r.get("bytes"))

    rows = sorted(rows, key=lambda r: (op_of(r), ws_of(r), str(r.get("device")), size_of(r) or 0))
    ok = [r.get("status") == "ok" for r in rows]
    times, t_unit = column([_num(r.get("p50_s")) if k else None for r, k in zip(rows, ok)], "s")
    alg, a_unit = column([_num(r.get("algbw_Bps", r.get("bytes_per_s"))) if k else None for r, k in zip(rows, ok)],
                         "B/s")
    bus, b_unit = column([_num(r.get("busbw_Bps")) if k else None for r, k in zip(rows, ok)], "B/s")
    info = []
    for i, r in enumerate(rows):
        p, extra = _params(r), json_object(r.get("extra"))
        size = size_of(r)
        dt = str(r.get("dtype") or p.get("dtype") or "")
        wrong = ("0" if extra.get("check") else "-") if ok[i] else STATUS_TEXT.get(r.get("status"), "?")
        info.append({"op": op_of(r), "ws": ws_of(r), "device": str(r.get("device")), "size": size, "dtype": dt,
                     "count": str(int(size // DTYPE_BYTES[dt])) if size and dt in DTYPE_BYTES else "-",
                     "redop": str(extra.get("redop") or REDOP.get(op_of(r), "none")),
                     "root": "-1" if extra.get("root") is None else str(extra.get("root")),
                     "wrong": wrong, "note": notes.refs(_notes(r, over, None)), "i": i})

    def avg(group):
        vals = [_num(rows[x["i"]].get("busbw_Bps")) for x in group if ok[x["i"]]]
        vals = [v for v in vals if v]
        return fmt(sum(vals) / len(vals), "B/s") if vals else "-"

    title = "collective (nccl-tests columns; time = p50"
    wss = sorted({x["ws"] for x in info})
    keys = [(x["op"], x["size"], x["dtype"], x["ws"]) for x in info]
    if 1 < len(wss) <= 3 and len(set(keys)) == len(keys):
        head = ["size", "count", "type", "redop", "root"]
        for _ in wss:
            head += ["time", "algbw", "busbw"]
        head += ["#wrong", "fn"]
        body, groups = [], {}
        for op in sorted({x["op"] for x in info}):
            mine = [x for x in info if x["op"] == op]
            groups[len(body)] = f"{op}  Avg bus bandwidth: " + ", ".join(
                f"{avg([x for x in mine if x['ws'] == w])} ({w} ranks)" for w in wss if any(x["ws"] == w for x in mine))
            for size, dt in sorted({(x["size"] or 0, x["dtype"]) for x in mine}):
                at = {x["ws"]: x for x in mine if (x["size"] or 0) == size and x["dtype"] == dt}
                first = next(iter(at.values()))
                cells = [_size_text(size) if size else "-", first["count"], dt, first["redop"], first["root"]]
                for w in wss:
                    x = at.get(w)
                    cells += ["", "", ""] if x is None else [times[x["i"]], alg[x["i"]], bus[x["i"]]]
                wrong = {x["wrong"] for x in at.values()}
                cells += [wrong.pop() if len(wrong) == 1 else "/".join(x["wrong"] for x in at.values()),
                          ",".join(dict.fromkeys(",".join(x["note"] for x in at.values() if x["note"]).split(",")))
                          .strip(",")]
                body.append(cells)
        if _natural_width(head, body) <= width():
            top = [(5 + 3 * j, 7 + 3 * j, f"-- {w} ranks --") for j, w in enumerate(wss)]
            return _wrap(f"{title} in {t_unit}, algbw {a_unit}, busbw {b_unit}; fn = footnotes)") + text_table(
                head, body, right=set(range(0, len(head) - 1)) - {2, 3}, flex=len(head) - 1, groups=groups, top=top)
    body, groups = [], {}
    last = None
    for x in info:
        key = (x["op"], x["ws"], x["device"])
        if key != last:
            grp = [y for y in info if (y["op"], y["ws"], y["device"]) == key]
            groups[len(body)] = f"{key[0]}, {key[1]} ranks on {key[2]}  Avg bus bandwidth: {avg(grp)}"
            last = key
        body.append([_size_text(x["size"]) if x["size"] else "-", x["count"], x["dtype"], x["redop"], x["root"],
                     times[x["i"]], alg[x["i"]], bus[x["i"]], x["wrong"], x["note"]])
    headers = ["size", "count", "type", "redop", "root", f"time {t_unit}", f"algbw {a_unit}", f"busbw {b_unit}",
               "#wrong", "note"]
    return _wrap(title + ")") + text_table(headers, body, right={0, 1, 4, 5, 6, 7, 8}, flex=9, groups=groups)


LATENCY = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))


def serving_summary(entries: list[dict]) -> list[str]:
    """The request composites in vLLM benchmark_serving's summary shape: request
    throughput (req/s), output token throughput (tok/s), goodput (req/s), and TTFT, TPOT,
    ITL and E2E as mean / median / P99 in ms; one row per metric, one column per composite
    (A, B, ... named under the table), as many columns as the width allows. Composites
    without requests (the TP step) have no TTFT and are left to the composite table."""
    reqs = [e for e in entries if isinstance(e, dict) and e.get("ttft_p50_s") is not None]
    if not reqs:
        return []

    def val(e, key):
        v = e.get(key)
        return _num(v.get("value") if isinstance(v, dict) else v)

    def plain(v):
        return "-" if v is None else f"{v:.4g}"

    def ms(v):
        if v is None:
            return "-"
        v *= 1e3
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"

    def trio(e, key):
        vals = [_num(e.get(f"{key}_{q}_s")) for q in ("mean", "p50", "p99")]
        return "-" if all(v is None for v in vals) else "/".join(ms(v) for v in vals)

    def table(chunk, letters):
        rows = [["Requests/s"] + [plain(val(e, "request_throughput")) for e in chunk],
                ["Output tokens/s"] + [plain(val(e, "output_throughput")) for e in chunk],
                ["Goodput req/s"] + [plain(val(e, "goodput")) for e in chunk]]
        rows += [[f"{label} ms"] + [trio(e, key) for e in chunk] for label, key in LATENCY]
        rows = [r for r in rows if any(c != "-" for c in r[1:])]
        return ["metric"] + letters, rows

    names = short_labels(reqs, "composite", devices=False)
    layers = {(str((e.get("truncation") or {}).get("layers_run")), str((e.get("truncation") or {}).get("model_layers")))
              for e in reqs if (e.get("truncation") or {}).get("model_layers")}
    common = len(layers) == 1 and len([e for e in reqs if (e.get("truncation") or {}).get("model_layers")]) == len(reqs)
    whole_model = f"{next(iter(layers))[0]}/{next(iter(layers))[1]} layers, scaled" if common else "full model"
    out = _wrap(f"serving (vLLM benchmark_serving; latency mean/median/P99; {whole_model})")
    start = 0
    while start < len(reqs):
        per = len(reqs) - start
        while per > 1:  # as many composites side by side as the width holds
            head, rows = table(reqs[start:start + per], ["X"] * per)
            if _natural_width(head, rows) <= width():
                break
            per -= 1
        chunk = reqs[start:start + per]
        letters = [chr(ord("A") + start + j) if start + j < 26 else str(start + j) for j in range(len(chunk))]
        head, rows = table(chunk, letters)
        out += text_table(head, rows, right=set(range(1, len(letters) + 1)))
        legend = []
        for j, e in enumerate(chunk):
            slo = _num(e.get("slo_fraction"))
            tr = e.get("truncation") or {}
            whole = f" {tr.get('layers_run')}/{tr.get('model_layers')} layers" if tr.get("model_layers") and not common \
                else ""
            legend.append(f"{letters[j]} {names[start + j]}{whole}" + (f" ({slo:.0%} meet SLO)" if slo is not None else ""))
        out.extend(_wrap("; ".join(legend), "  "))
        start += len(chunk)
    return out


def _capacity_line(doc: dict) -> list[str]:
    from harness.units import fmt

    cap = doc.get("capacity") or {}
    if cap.get("C_eff") is None:
        return _wrap(f"capacity: not measurable — {cap.get('reason') or 'no serving composite'}")
    from harness.headline import short_case

    eps = _num(cap.get("epsilon"))
    ws = f" at world size {cap['world_size']}" if cap.get("world_size") else ""
    return _wrap(f"capacity, best configuration{ws}: C_eff {fmt(cap.get('C_eff'), 'tok/s')}, "
                 f"C_nom {fmt(cap.get('C_nom'), 'tok/s')}, eps {'-' if eps is None else f'{eps:.3g}'} "
                 f"({short_case(cap.get('from_case'))})")


def _indicator_table(doc: dict, notes: Footnotes, everything: bool) -> list[str]:
    """Indicators: every one (``everything``) or those judged warn / fail or not judged
    other than the serving ones (the composite table shows those), with a line counting
    the rest; their reasons and notes go to footnotes."""
    from collections import Counter

    from harness.collector import indicator_rows

    rows = indicator_rows(doc)
    lookup = {}
    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for name, ind in (doc.get(mode) or {}).items():
            lookup[(mode, name)] = ind
    entries = [e for e in doc.get("serving") or [] if isinstance(e, dict) and e.get("case_id")]
    short = dict(zip((e["case_id"] for e in entries), short_labels(entries, "composite")))
    serving_names = {f"{key} {cid}": f"{key} {label}" for cid, label in short.items()
                     for key in ("kappa", "C_eff", "C_nom", "epsilon", "request_throughput", "output_throughput",
                                 "goodput", "j_per_token", "tokens_per_j")}
    shown, rest = [], Counter()
    for r in rows:
        ind = lookup.get((r["mode"], r["name"]), {})
        r = {**r, "not_judged": bool(ind.get("not_judged"))}
        if r["mode"] == "serving":
            r["name"] = serving_names.get(r["name"], r["name"])
            if not everything:
                continue
        if everything or r["verdict"] in ("warn", "fail") or r["not_judged"]:
            shown.append(r)
        else:
            rest[r["verdict"]] += 1
    out = []
    if shown:
        body = []
        for r in shown:
            verdict = "not judged" if r["not_judged"] else str(r["verdict"])
            body.append([r["mode"].replace("mode", "m"), r["name"], _value_text(r["value"], r["unit"]),
                         verdict, notes.refs([r["reason"]] if r["reason"] else [])])
        out += _wrap("indicators" + ("" if everything else " (warn, fail and not judged; kappa is with the composites)"))
        out += text_table(["mode", "indicator", "value", "verdict", "fn"], body, right={2}, flex=1)
    if rest:
        out += _wrap("other indicators: " + ", ".join(f"{n} {v}" for v, n in sorted(rest.items()))
                     + " (all: coherence collect RUN)")
    return out


def _value_text(value, unit: str | None) -> str:
    from harness.units import fmt

    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if unit in ("s", "B/s", "FLOP/s", "B", "tokens/s", "tok/s"):
        return fmt(value, unit)
    if unit and "%" in unit:
        return f"{value:.3g}%"
    return f"{value:.3g}"


def _covers(spec: str, device: str) -> bool:
    """Whether a case's device ``spec`` includes ``device``: the same id, a rank range
    of its type ("cuda:0-1" covers "cuda:1") or a '+'-joined list of either."""
    for part in str(spec).split("+"):
        if part == device:
            return True
        kind, _, idx = part.partition(":")
        dkind, _, didx = device.partition(":")
        lo, dash, hi = idx.partition("-")
        if dash and kind == dkind and lo.isdigit() and hi.isdigit() and didx.isdigit() \
                and int(lo) <= int(didx) <= int(hi):
            return True
    return False


def energy_text(device: str, records: list[dict], notes: Footnotes) -> str:
    """One line on how energy was measured on ``device`` over its ok cases (those whose
    device spec covers it, composites across ranks included): "energy: <method>
    (<scope>)" with the count where some cases lack it, "energy: not measured — <reason>"
    where none has it (the most common ``energy_reason``; other reasons as footnotes in
    ``notes``), or that the run predates energy accounting (no ``energy_j`` column).
    The methods and scopes are those of harness' energy meters (NVML total-energy
    counter, NVML power integral, RAPL powercap zones)."""
    from collections import Counter

    mine = [r for r in records if r.get("status") == "ok" and _covers(str(r.get("device")), device)]
    if not mine:
        return "  energy: no ok case on this device"
    if not any("energy_j" in r for r in mine):
        return "  energy: not recorded (the run predates energy accounting)"

    def text(v) -> str | None:
        return v if isinstance(v, str) and v else None

    measured = [r for r in mine if _num(r.get("energy_j")) is not None]
    missing = [r for r in mine if _num(r.get("energy_j")) is None]
    reasons = Counter(text(r.get("energy_reason")) or "energy_j is null and no reason was recorded" for r in missing)
    if not measured:
        (top, _), *others = reasons.most_common()
        refs = notes.refs([f"energy not measured: {why}" for why, _ in others])
        return f"  energy: not measured - {top}" + (f" (other reasons: fn {refs})" if refs else "")
    hows = Counter(f"{text(r.get('energy_method')) or 'method not recorded'}"
                   + (f" ({text(r.get('energy_scope'))})" if text(r.get("energy_scope")) else "") for r in measured)
    line = "  energy: " + ", ".join(how if len(hows) == 1 else f"{how} {n}" for how, n in hows.most_common())
    if missing:
        refs = notes.refs([f"energy not measured: {why}" for why in reasons])
        line += f" on {len(measured)} of {len(mine)} ok cases; {len(missing)} not measured (fn {refs})"
    return line


FAMILY_ORDER = ("memory", "gemm", "prefill", "decode", "overhead", "transfer", "collective", "composite")


def run_text(manifest: dict, cases, indicators: dict | None = None, summary: dict | None = None) -> list[str]:
    """The lines `coherence show` prints: the verdict summary first, the run's header,
    the capacity headline, one table per probe family, the serving summary, the
    indicators that need attention and the footnotes; none wider than :func:`width`."""
    from harness.collector.oversubscribe import oversubscribed_cases
    from harness.headline import summarize
    from harness.units import fmt

    records = cases.to_dict(orient="records") if len(cases) else []
    if records and "case_id" in cases:
        seen = {}
        for r in records:  # one row per case (the last, where a table repeats one)
            seen[r["case_id"]] = r
        records = list(seen.values())
    summary = summary or summarize(records, indicators, manifest)
    over = (indicators or {}).get("oversubscribed") or oversubscribed_cases(manifest, records)
    out = headline_text(summary)
    rounds = manifest.get("rounds") or 1
    started, finished = str(manifest.get("started_at") or "-"), str(manifest.get("finished_at") or "-")
    if started[:11] == finished[:11]:  # same day: the date once
        finished = finished[11:]
    out += _wrap(f"run {manifest.get('run_id')} | {manifest.get('status')}"
                 + (f" | label {manifest.get('label')}" if manifest.get("label") else "")
                 + (f" | {rounds} rounds pooled" if rounds > 1 else "")
                 + (f" | schema v{manifest['schema_version']}" if manifest.get("schema_version") else "")
                 + (f" | {started} -> {finished}" if manifest.get("started_at") else ""))
    env = manifest.get("environment") or {}
    layers = (env.get("virtualization") or {}).get("summary")
    notes = Footnotes()
    for dev in manifest.get("devices", []):
        nom = dev.get("nominal") or {}
        peaks = ", ".join(f"{k} {fmt(v, 'FLOP/s')}" for k, v in (nom.get("compute_flops") or {}).items())
        out += _wrap(f"{dev.get('id')} {dev.get('name')}" + (f" on {layers}" if layers else "")
                     + f", nominal ({nom.get('kind', 'unknown')}): {peaks or 'compute unknown'}; "
                     f"memory {fmt(nom.get('memory_Bps'), 'B/s')}")
        out += _wrap(energy_text(str(dev.get("id")), records, notes), "    ")
    if indicators and not (indicators.get("capacity") or {}).get("C_eff"):
        out += _capacity_line(indicators)  # else the verdict's findings carry it
    families: dict[str, list[dict]] = {}
    for r in records:
        families.setdefault(str(r.get("family") or str(r.get("probe", "")).split(".")[0]), []).append(r)
    order = [f for f in FAMILY_ORDER if f in families] + sorted(f for f in families if f not in FAMILY_ORDER)
    for fam in order:
        if fam == "collective":
            out += _collective_table(families[fam], notes, over)
        elif fam == "composite" and indicators:
            out += _composite_table(families[fam], notes, over, indicators.get("serving") or [])
        else:
            out += _family_table(fam, families[fam], notes, over)
    if indicators:
        serving = serving_summary(indicators.get("serving") or [])
        if serving:
            out += [""] + serving
        ind = _indicator_table(indicators, notes, everything=False)
        if ind:
            out += [""] + ind
    if notes.texts:
        out += [""] + notes.lines()
    if not records:
        out.append("no cases")
    # Every line above is fitted already; this only guards the promise (never wider).
    return [_cut(_ascii(line), width()) for line in out]


def print_run(manifest: dict, cases, indicators: dict | None = None, summary: dict | None = None) -> None:
    """Print :func:`run_text` (``cases`` a DataFrame of cases.parquet; ``indicators`` the
    indicators.json document or None; ``summary`` harness.headline's, computed if None)."""
    _emit(run_text(manifest, cases, indicators, summary))


def print_indicators(doc: dict) -> None:
    """The capacity headline, the serving summary and every mode 1–4 indicator (as
    `coherence collect` prints them), fitted to the terminal's width."""
    notes = Footnotes()
    out = _capacity_line(doc)
    serving = serving_summary(doc.get("serving") or [])
    if serving:
        out += [""] + serving
    for entry in doc.get("serving") or []:
        wf = entry.get("waterfall")
        if not wf:
            continue
        parts = " → ".join(f"{b['name']} {seconds(b['seconds']) if b['seconds'] >= 0 else '-' + seconds(-b['seconds'])}"
                           for b in wf["bars"])
        out += _wrap(f"waterfall {entry['case_id']} ({wf['unit']}): {parts} = measured {seconds(wf['measured_mean_s'])}",
                     "    ")
    out += [""] + _indicator_table(doc, notes, everything=True)
    if notes.texts:
        out += [""] + notes.lines()
    _emit([_cut(_ascii(line), width()) for line in out])
