"""The report's figures: matplotlib (no pyplot, no global backend switch) rendered to
inline SVG with text kept as text.

matplotlib is the ``plot`` extra and is imported lazily: :func:`available` says whether
it can be, and why not. Each function takes plain data (lists, dicts) and returns one
SVG string; the element ids inside it are prefixed so that several SVGs in one page
never share an id.

Hover text without script: an artist given a tip (:func:`_tip`) is written by
matplotlib's SVG backend as ``<g id=GID>`` (its ``gid``); :func:`_svg` puts a
``<title>`` element first inside that group, which browsers show as the tooltip of
everything drawn in it (SVG 1.1 §5.4, "The 'desc' and 'title' elements"). Every
point, bar, line and heatmap cell carries its case id and figures that way.

Labels are never cut: a legend names what differs between its lines
(:func:`distinct_labels`: the parameters that vary), and long tick labels and titles
wrap onto more lines (:func:`_wrap`) instead of ending in an ellipsis.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import re

import numpy as np

_COUNTER = itertools.count(1)
FAMILY_COLORS = {
    "memory": "#1f77b4", "gemm": "#d62728", "prefill": "#ff7f0e", "decode": "#2ca02c",
    "transfer": "#9467bd", "collective": "#8c564b", "composite": "#e377c2", "overhead": "#7f7f7f",
}
DTYPE_MARKERS = {"fp64": "D", "fp32": "o", "tf32": "h", "bf16": "s", "fp16": "^", "fp8": "v", "int8": "P"}
CDF_POINTS = 200


def available() -> tuple[bool, str]:
    """(True, "") when matplotlib imports, else (False, why)."""
    try:
        import importlib

        # Import only to learn whether it works (a broken install raises here, not mid-plot).
        getattr(importlib.import_module("matplotlib.figure"), "Figure")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return False, f"matplotlib is not usable here ({type(exc).__name__}: {exc}); install the plot extra: pip install 'coherence[plot]'"
    return True, ""


def _figure(width: float = 7.5, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig


def _svg(fig) -> str:
    import matplotlib

    prefix = f"f{next(_COUNTER)}"
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "coherence"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    tips = getattr(fig, "_coherence_tips", {})
    if tips:
        text = re.sub(r'<g id="(tip\d+)">',
                      lambda m: f'<g id="{m.group(1)}"><title>{html.escape(tips[m.group(1)], quote=False)}</title>'
                      if m.group(1) in tips else m.group(0), text)
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})" if m.group(1) in ids else m.group(0), text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"' if m.group(1) in ids else m.group(0), text)
    return text


def _tip(fig, artist, text: str) -> None:
    """Give ``artist`` the hover text ``text`` (an SVG ``<title>`` written by :func:`_svg`)."""
    tips = fig.__dict__.setdefault("_coherence_tips", {})
    gid = f"tip{len(tips) + 1}"
    artist.set_gid(gid)
    tips[gid] = text


def _wrap(label: str, width: int = 60) -> str:
    """``label`` on as many lines of at most ~``width`` characters as it needs, broken
    after commas, spaces and brackets (case ids have no spaces); never shortened."""
    label = str(label)
    if len(label) <= width:
        return label
    # A zero-width break opportunity after each separator, then textwrap on spaces.
    spaced = re.sub(r"([,\[\]@/ ])", lambda m: m.group(1) + "\u0000", label)
    words = [w for w in spaced.split("\u0000") if w]
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + len(w) > width:
            lines.append(cur)
            cur = ""
        cur += w
        while len(cur) > width:  # one word longer than a line: hard break
            lines.append(cur[:width])
            cur = cur[width:]
    if cur:
        lines.append(cur)
    return "\n".join(line.strip() for line in lines)


_CASE_ID = re.compile(r"^(?P<probe>[^\[@]+)(?:\[(?P<params>.*)\])?(?:@(?P<device>.*))?$")


def split_case_id(case_id: str) -> tuple[str, dict[str, str], str]:
    """``probe[k=v,...]@device`` -> (probe, {k: v}, device); an id of another shape is
    its own probe with no parameters."""
    m = _CASE_ID.match(str(case_id))
    if not m:
        return str(case_id), {}, ""
    params = {}
    # A value may hold commas (a list); split only before "key=".
    for part in re.split(r",(?=[A-Za-z_][\w.]*=)", m.group("params") or ""):
        if part:
            k, _, v = part.partition("=")
            params[k] = v
    return m.group("probe"), params, m.group("device") or ""


def distinct_labels(case_ids: list[str]) -> dict[str, str]:
    """Each case id shortened to what tells it apart from the others in ``case_ids``: the
    probe if probes differ, the parameters whose values differ (``k=v``), the device if
    devices differ. A legend of these says exactly what differs between its lines
    (world_size=1 against world_size=2) instead of a common prefix cut before it.
    A single id, or ids that differ in nothing parsed, keep their full text."""
    parsed = {c: split_case_id(c) for c in case_ids}
    if len(parsed) < 2:
        return {c: str(c) for c in case_ids}
    probes = {p for p, _, _ in parsed.values()}
    keys: list[str] = []
    for _, params, _ in parsed.values():
        keys += [k for k in params if k not in keys]
    varying = [k for k in keys if len({params.get(k) for _, params, _ in parsed.values()}) > 1]
    def label(probe, params, device, with_device, with_absent):
        parts = [probe] if len(probes) > 1 else []
        parts += [f"{k}={params[k]}" if k in params else f"no {k}" for k in varying if k in params or with_absent]
        if with_device:
            parts.append(f"@{device}")
        return ", ".join(parts)

    # The device, and "no k" for a parameter a case does not have, only where the rest
    # does not already tell the cases apart (cpu:0-1 against cpu:0-3 says nothing
    # world_size=2 against 4 does not).
    for with_device, with_absent in ((False, False), (False, True), (True, True)):
        out = {c: label(*v, with_device, with_absent) for c, v in parsed.items()}
        if len(set(out.values())) == len(out):
            break
    out = {c: v or str(c) for c, v in out.items()}
    if len(set(out.values())) < len(out):  # two ids told apart by nothing parsed
        return {c: str(c) for c in case_ids}
    return out


# Tick labels through the harness's one unit formatter (harness.units).
def _fmt_si(v: float, unit: str) -> str:
    from harness.units import fmt

    return fmt(v, unit)


def _fmt_s(v: float) -> str:
    from harness.units import fmt

    return fmt(v, "s")


def _fmt_bytes(v: float) -> str:
    from harness.units import binary

    return binary(v)


def _log_labels(axis, fmt) -> None:
    """Plain-text tick labels on a log axis (units instead of mathtext powers of ten,
    which also cost most of the rendering time); minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _pos):
        # Label the 2× and 5× minor ticks when the view spans few decades (else an
        # axis inside one decade would have no label at all).
        lo, hi = sorted(axis.get_view_interval())
        if v <= 0 or lo <= 0 or hi / lo > 30:
            return ""
        mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
        return fmt(v) if round(mantissa) in (2, 5) or hi / lo < 4 else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(v) if v > 0 else ""))
    axis.set_minor_formatter(FuncFormatter(minor))


def _time_axis(ax, series) -> None:
    """x as a duration axis: log when the data span more than 20×, else linear (a tight
    distribution on a log axis inside one decade has no readable ticks)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    vals = [np.asarray(v, dtype=float) for v in series]
    vals = [v[np.isfinite(v) & (v > 0)] for v in vals]
    vals = [v for v in vals if v.size]
    lo = min((float(v.min()) for v in vals), default=1.0)
    hi = max((float(v.max()) for v in vals), default=1.0)
    if hi / lo > 20:
        ax.set_xscale("log")
        _log_labels(ax.xaxis, _fmt_s)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt_s(v) if v > 0 else "0"))


# -- run report ------------------------------------------------------------------------
def waterfall(bars: list[dict], measured_s: float, slo_misses_s: float, effective_s: float, unit: str,
              title: str) -> str:
    """Seconds per step from the nominal step to the effective one: the nominal bar,
    each loss floating on the running total, the measured mean, SLO misses, effective.

    ``bars``: [{"name", "seconds"}] (first the nominal step, then signed losses);
    ``title`` is the composite's case id, also each bar's hover title. Tick labels wrap
    (never cut)."""
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot()
    labels, bottoms, heights, colors, texts = [], [], [], [], []
    total = 0.0
    for i, bar in enumerate(bars):
        s = float(bar["seconds"])
        labels.append(bar["name"])
        if i == 0:
            bottoms.append(0.0)
            heights.append(s)
            colors.append("#2456a6")
            texts.append(_fmt_s(s))
            total = s
            continue
        bottoms.append(total if s >= 0 else total + s)
        heights.append(abs(s))
        colors.append("#d62728" if s > 0 else "#2ca02c")
        texts.append("0" if s == 0 else ("+" if s > 0 else "") + _fmt_s(s))
        total += s
    for name, bottom, height, color, text in (
        ("measured mean", 0.0, measured_s, "#555555", _fmt_s(measured_s)),
        ("SLO misses", measured_s, max(slo_misses_s, 0.0), "#ff7f0e", "+" + _fmt_s(slo_misses_s) if slo_misses_s else "0"),
        ("effective", 0.0, effective_s, "#1d2330", _fmt_s(effective_s)),
    ):
        labels.append(name)
        bottoms.append(bottom)
        heights.append(height)
        colors.append(color)
        texts.append(text)
    x = np.arange(len(labels))
    scale = 1e3
    drawn = ax.bar(x, np.array(heights) * scale, bottom=np.array(bottoms) * scale, color=colors, width=0.62)
    for xi, b, h, text, rect, name in zip(x, bottoms, heights, texts, drawn, labels):
        ax.text(xi, (b + h) * scale, text, ha="center", va="bottom", fontsize=7.5)
        _tip(fig, rect, f"{title}\n{name}: {text}; bar from {_fmt_s(b)} to {_fmt_s(b + h)}")
    top = max((b + h) for b, h in zip(bottoms, heights)) * scale
    ax.set_ylim(min(0.0, min(bottoms) * scale), top * 1.12 if top > 0 else 1.0)
    ax.set_xticks(x)
    # Whole labels, wrapped to the bar's width, horizontal: rotated labels were cut.
    ax.set_xticklabels([_wrap(lab, 12) for lab in labels], rotation=0, ha="center", fontsize=7)
    ax.set_ylabel(_wrap(f"ms ({unit})", 60), fontsize=8)
    ax.set_title(_wrap(title, 110), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def roofline(points: list[dict], ceilings: dict, title: str) -> str:
    """Achieved FLOP/s (at p50) against arithmetic intensity (FLOP/byte), log-log.

    ``points``: {ai, rate, family, dtype, label}. ``ceilings``: {"compute": {dtype:
    {"N": .., "I": ..}}, "memory": {"N": .., "I": ..}}; solid lines are nominal, dashed
    measured (best isolated). A roof is drawn where both a compute and a memory ceiling
    of the same kind exist."""
    fig = _figure(8.5, 5.0)
    ax = fig.add_subplot()
    ais = [p["ai"] for p in points]
    rates = [p["rate"] for p in points]
    comp = ceilings.get("compute") or {}
    mem = ceilings.get("memory") or {}
    lo_x, hi_x = min(ais + [1.0]) / 4, max(ais + [1.0]) * 4
    for kind in ("N", "I"):
        peaks = [v[kind] for v in comp.values() if v.get(kind)]
        if mem.get(kind) and peaks:
            ridge = max(peaks) / mem[kind]
            lo_x, hi_x = min(lo_x, ridge / 4), max(hi_x, ridge * 4)
    xs = np.logspace(math.log10(lo_x), math.log10(hi_x), 200)
    dtypes = sorted({p["dtype"] for p in points if p.get("dtype")} | set(comp))
    palette = ["#1d2330", "#2456a6", "#b8860b", "#6a3d9a", "#008080", "#a0522d"]
    for i, dtype in enumerate(dtypes):
        c = comp.get(dtype) or {}
        color = palette[i % len(palette)]
        for kind, style in (("N", "-"), ("I", "--")):
            peak = c.get(kind)
            if not peak:
                continue
            roof = np.full_like(xs, peak)
            if mem.get(kind):
                roof = np.minimum(roof, mem[kind] * xs)
            what = "nominal" if kind == "N" else "measured"
            ax.plot(xs, roof, style, color=color, lw=1.2, alpha=0.85,
                    label=f"{what} {dtype} {_fmt_si(peak, 'FLOP/s')}")
    for kind, style in (("N", "-"), ("I", "--")):
        if mem.get(kind) and not any((comp.get(d) or {}).get(kind) for d in dtypes):
            ax.plot(xs, mem[kind] * xs, style, color="#444444", lw=1.0)
        if mem.get(kind):
            what = "nominal" if kind == "N" else "measured"
            ax.plot([], [], style, color="#888888", label=f"{what} memory {_fmt_si(mem[kind], 'B/s')} (slope)")
    seen = set()
    for p in points:
        fam, dtype = p.get("family") or "other", p.get("dtype") or ""
        key = (fam, dtype)
        dot = ax.scatter([p["ai"]], [p["rate"]], s=26, color=FAMILY_COLORS.get(fam, "#17becf"),
                         marker=DTYPE_MARKERS.get(dtype, "o"), edgecolors="black", linewidths=0.4, zorder=3,
                         label=f"{fam} {dtype}".strip() if key not in seen else None)
        _tip(fig, dot, f"{p.get('label')}\n{_fmt_si(p['rate'], 'FLOP/s')} at p50, "
                       f"arithmetic intensity {p['ai']:.3g} FLOP/byte")
        seen.add(key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_labels(ax.xaxis, lambda v: f"{v:g}")
    _log_labels(ax.yaxis, lambda v: _fmt_si(v, ""))
    ax.set_xlim(lo_x, hi_x)
    top = max(rates + [v.get(k) or 0 for v in comp.values() for k in ("N", "I")])
    bottom = min(rates) if rates else top / 1e3
    ax.set_ylim(bottom / 3, top * 2.5)
    ax.set_xlabel("arithmetic intensity (FLOP / byte, work model)")
    ax.set_ylabel("achieved FLOP/s at p50")
    ax.set_title(_wrap(title, 110), fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _svg(fig)


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, F(x)) of the empirical CDF for a step plot: scipy.stats.ecdf's distinct values
    and probabilities; above CDF_POINTS points, its quantiles at CDF_POINTS evenly
    spaced probabilities instead (the same curve, a bounded SVG)."""
    from scipy.stats import ecdf

    x = np.asarray(values, dtype=float)
    if x.size > CDF_POINTS:
        q = np.linspace(0.0, 1.0, CDF_POINTS)
        return np.quantile(x, q), q
    cdf = ecdf(x).cdf
    return np.asarray(cdf.quantiles, dtype=float), np.asarray(cdf.probabilities, dtype=float)


LINE_STYLES = ("-", "--", ":", "-.")


def latency_cdf(series: dict[str, np.ndarray], title: str, legend_max: int = 12) -> str:
    """Empirical CDF of per-repetition durations (seconds), one line per case id in
    ``series``, log time axis when the data span more than 20×.

    The legend names each line by what differs between the cases (:func:`distinct_labels`)
    and sits below the axes; past ``legend_max`` lines there is no legend (the caller
    splits such a family into panels, see run_report.latency_panels). Each line's hover
    title is its case id with n, p50 and p99."""
    import matplotlib

    names = distinct_labels(list(series))
    fig = _figure(6.3, 3.3)
    ax = fig.add_subplot()
    colors = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    for i, (label, values) in enumerate(series.items()):
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v) & (v > 0)]
        if not v.size:
            continue
        x, y = _ecdf(v)
        # past ten lines the colours repeat: a second line style tells them apart
        (line,) = ax.step(x, y, where="post", lw=1.1, color=colors[i % len(colors)],
                          ls=LINE_STYLES[(i // len(colors)) % len(LINE_STYLES)], label=names[label])
        _tip(fig, line, f"{label}\nn {v.size}, p50 {_fmt_s(float(np.median(v)))}, "
                        f"p99 {_fmt_s(float(np.quantile(v, 0.99)))}, max {_fmt_s(float(v.max()))}")
    for q in (0.5, 0.99):
        ax.axhline(q, color="#999999", lw=0.7, ls=":")
        ax.text(1.0, q, f" p{int(q * 100)}", transform=ax.get_yaxis_transform(), fontsize=7, va="center")
    _time_axis(ax, series.values())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("duration per repetition")
    ax.set_ylabel("fraction of repetitions ≤ x")
    ax.set_title(_wrap(title, 90), fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    if len(series) <= legend_max:
        longest = max((len(n) for n in names.values()), default=0)
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(0.0, -0.2), frameon=False,
                  ncol=2 if longest <= 45 and len(series) > 3 else 1)
    return _svg(fig)


def collective_busbw(lines: dict[str, list[tuple]], nominal_link: float | None, title: str) -> str:
    """busbw (B/s at p50) against message size (bytes), one line per operation.

    ``lines``: op label -> [(size_bytes, busbw_Bps[, case_id])]; with a case id, the
    point's hover title names it (busbw as nccl-tests defines it, PERFORMANCE.md)."""
    fig = _figure(8.0, 4.2)
    ax = fig.add_subplot()
    for op, pts in sorted(lines.items()):
        pts = sorted(pts, key=lambda p: p[0])
        (line,) = ax.plot([p[0] for p in pts], [p[1] / 1e9 for p in pts], lw=1.2, label=op)
        for p in pts:
            dot = ax.scatter([p[0]], [p[1] / 1e9], s=16, color=line.get_color(), zorder=3)
            case = p[2] if len(p) > 2 else op
            _tip(fig, dot, f"{case}\n{_fmt_bytes(p[0])}: busbw {_fmt_si(p[1], 'B/s')} at p50")
    if nominal_link:
        ax.axhline(nominal_link / 1e9, color="#1d2330", ls="--", lw=1.0, label=f"nominal link {_fmt_si(nominal_link, 'B/s')}")
    ax.set_xscale("log", base=2)
    _log_labels(ax.xaxis, _fmt_bytes)
    ax.set_xlabel("message size")
    ax.set_ylabel("busbw at p50 (GB/s)")
    ax.set_title(_wrap(title, 110), fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _svg(fig)


def heatmap(matrix: list[list[float | None]], rows: list[str], cols: list[str], title: str,
            unit: str = "GB/s", scale: float = 1e9, tips: list[list[str | None]] | None = None) -> str:
    """A bandwidth matrix (source rows × destination columns, values in B/s shown in
    ``unit`` = value / ``scale``); empty cells grey. ``tips``: per cell the hover text
    (case id and figures), drawn as a transparent cell-sized rectangle with a title
    (an image has no per-cell element to hover)."""
    data = np.array([[np.nan if v is None else v / scale for v in row] for row in matrix], dtype=float)
    fig = _figure(max(4.5, 1.4 * len(cols) + 2.5), max(2.4, 0.55 * len(rows) + 1.6))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(data)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e8ee")
    finite = data[np.isfinite(data)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin * 0.9, vmax * 1.1 + 1e-12
    from matplotlib.colors import LogNorm, Normalize

    # Device-local copies run ~100× faster than host links: a log scale keeps both legible.
    norm = LogNorm(vmin, vmax) if vmin > 0 and vmax / vmin > 10 else Normalize(vmin, vmax)
    im = ax.imshow(masked, cmap=cmap, aspect="auto", norm=norm)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            text = "—" if not np.isfinite(v) else (f"{v:,.0f}" if v >= 1000 else f"{v:.3g}")
            color = "white" if np.isfinite(v) and norm(v) < 0.5 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
            tip = tips[i][j] if tips and i < len(tips) and j < len(tips[i]) else None
            if tip:
                from matplotlib.patches import Rectangle

                # fill present but fully transparent: hoverable (pointer-events
                # "visiblePainted" needs a fill, not an opaque one)
                cell = Rectangle((j - 0.5, i - 0.5), 1.0, 1.0, facecolor="white", alpha=0.0, edgecolor="none")
                ax.add_patch(cell)
                _tip(fig, cell, f"{rows[i]} → {cols[j]}: {text} {unit}\n{tip}")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([_wrap(c, 18) for c in cols], rotation=0, ha="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_wrap(r, 24) for r in rows], fontsize=8)
    ax.set_xlabel("destination")
    ax.set_ylabel("source")
    ax.set_title(_wrap(title, 110), fontsize=9)
    fig.colorbar(im, ax=ax, label=unit, shrink=0.85)
    return _svg(fig)


def link_matrix(matrix: list[list[float | None]], labels: list[str], flagged: list, slow_nodes: list[int],
                title: str, scale: float = 1e9) -> str:
    """The pairwise link matrix of ``collective.pairwise`` (rows = sending rank, columns =
    receiving rank, B/s; None unmeasured or the diagonal) as GB/s cells; flagged links
    (``flagged``: (src, dst) pairs, below θ × the group median, harness.collector.links)
    get a red frame and slow nodes a red tick label."""
    n = len(matrix)
    data = np.array([[np.nan if v is None else float(v) / scale for v in row] for row in matrix], dtype=float)
    fig = _figure(max(4.5, 0.9 * n + 3.0), max(3.0, 0.7 * n + 1.8))
    ax = fig.add_subplot()
    import matplotlib
    from matplotlib.patches import Rectangle

    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#e6e8ee")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto")
    finite = data[np.isfinite(data)]
    mid = float(np.median(finite)) if finite.size else 0.0
    for i in range(n):
        for j in range(n):
            v = data[i, j]
            text = "—" if not np.isfinite(v) else f"{v:.3g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if n > 8 else 8,
                    color="white" if np.isfinite(v) and v < mid else "black")
    for src, dst in flagged:
        ax.add_patch(Rectangle((dst - 0.5, src - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2))
    # "rank 12 (host, cuda:3)" on two lines: the rank, then where it runs.
    short = [lab.replace(" (", "\n(", 1) for lab in labels]
    ax.set_xticks(range(n))
    ax.set_xticklabels(short, rotation=0, ha="center", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(short, fontsize=7)
    for k in slow_nodes:
        ax.get_xticklabels()[k].set_color("#d62728")
        ax.get_yticklabels()[k].set_color("#d62728")
    ax.set_xlabel("receiving rank")
    ax.set_ylabel("sending rank")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="GB/s" if scale == 1e9 else "B/s", shrink=0.85)
    return _svg(fig)


def grouped_bars(groups: list[str], series: dict[str, list[float | None]], ylabel: str, title: str,
                 scale: float = 1e9, log: bool = False, tips: dict[str, list[str | None]] | None = None) -> str:
    """Horizontal grouped bars: one group per entry of ``groups``, one bar per series
    (values / ``scale`` on the axis). ``tips``: series -> per group the bar's hover text
    (its case id); without it the title is the group, series and value."""
    n_groups, names = len(groups), list(series)
    fig = _figure(8.5, max(2.4, 0.35 * n_groups * max(1, len(names)) + 1.2))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        vals = series[name]
        ys = np.arange(n_groups) + k * height
        xs = [0.0 if v is None else v / scale for v in vals]
        bars = ax.barh(ys, xs, height=height * 0.95, label=name)
        for gi, (y, v, b) in enumerate(zip(ys, vals, bars)):
            if v is not None:
                ax.text(b.get_width(), y, f" {v / scale:.3g}", va="center", fontsize=7)
                tip = (tips or {}).get(name, [None] * n_groups)[gi] or groups[gi]
                _tip(fig, b, f"{tip}\n{name}: {v / scale:.3g} {ylabel}")
    ax.set_yticks(np.arange(n_groups) + height * (len(names) - 1) / 2)
    ax.set_yticklabels([_wrap(g, 60) for g in groups], fontsize=7.5)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
        _log_labels(ax.xaxis, lambda v: f"{v:g}")
    ax.set_xlabel(ylabel)
    ax.set_title(_wrap(title, 110), fontsize=9)
    ax.grid(axis="x", alpha=0.2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _svg(fig)


# -- compare report --------------------------------------------------------------------
def cdf_overlays(cases: list[dict], title: str, ncols: int = 3) -> str:
    """Small multiples: per case the baseline's and the candidate's duration ECDFs
    (seconds). ``cases``: {label (case id), a, b, verdict, tau (SLA threshold or None)};
    each line's hover title is the case id, side, n and p50/p99; titles wrap whole."""
    n = len(cases)
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(4.0 * min(ncols, n), 2.9 * nrows)
    colors = {"regressed": "#d62728", "improved": "#2ca02c"}
    for i, case in enumerate(cases):
        ax = fig.add_subplot(nrows, min(ncols, n), i + 1)
        for values, color, name in ((case["a"], "#2456a6", "baseline"), (case["b"], "#ff7f0e", "candidate")):
            v = np.asarray(values, dtype=float)
            v = v[np.isfinite(v) & (v > 0)]
            if v.size:
                x, y = _ecdf(v)
                (line,) = ax.step(x, y, where="post", color=color, lw=1.2, label=name)
                _tip(fig, line, f"{case['label']}\n{name}: n {v.size}, p50 {_fmt_s(float(np.median(v)))}, "
                                f"p99 {_fmt_s(float(np.quantile(v, 0.99)))}; verdict {case.get('verdict')}")
        if case.get("tau"):
            ax.axvline(case["tau"], color="#555555", ls=":", lw=0.9, label="SLA τ")
        _time_axis(ax, [case["a"], case["b"]])
        ax.set_ylim(0, 1.02)
        ax.tick_params(which="both", labelsize=6.5)
        ax.set_title(_wrap(case["label"], 58), fontsize=6.5, color=colors.get(case.get("verdict"), "#1d2330"))
        ax.grid(True, which="both", alpha=0.2)
        if i == 0:
            ax.legend(fontsize=6.5, loc="lower right")
    fig.suptitle(title.replace(" (log time)", ""), fontsize=9)
    fig.tight_layout()
    return _svg(fig)


def sla_amplification(rows: list[dict], gate: float | None, title: str) -> str:
    """Per case v_B / v_A (log axis); new violations (v_A = 0) drawn at the axis edge.
    ``rows``: {label (case id), amp, verdict}; labels wrap whole; each bar's hover title
    is the case id, amplification and verdict."""
    labels = [_wrap(r["label"], 60) for r in rows]
    finite = [r["amp"] for r in rows if r["amp"] is not None and math.isfinite(r["amp"]) and r["amp"] > 0]
    hi = max(finite + [gate or 2.0, 2.0]) * 3
    lo = min(finite + [0.5]) / 3
    lines = sum(lab.count("\n") + 1 for lab in labels)
    fig = _figure(8.5, max(2.4, 0.14 * lines + 0.14 * len(rows) + 1.2))
    ax = fig.add_subplot()
    for y, r in enumerate(rows):
        amp = r["amp"]
        color = {"regressed": "#d62728", "improved": "#2ca02c"}.get(r.get("verdict"), "#2456a6")
        bar = None
        if amp is None:
            txt = ax.text(1.0, y, " no violations on either side", va="center", fontsize=7, color="#777777")
            _tip(fig, txt, f"{r['label']}\nno violations of τ on either side; verdict {r.get('verdict')}")
        elif math.isinf(amp):
            bar = ax.barh(y, hi - 1.0, left=1.0, color=color, alpha=0.6, height=0.6)[0]
            ax.text(hi, y, " new violations", va="center", fontsize=7)
        elif amp >= 1:
            bar = ax.barh(y, amp - 1.0, left=1.0, color=color, height=0.6)[0]
        else:
            bar = ax.barh(y, 1.0 - amp, left=amp, color=color, height=0.6)[0]
        if bar is not None:
            what = "new violations (none in the baseline)" if math.isinf(amp) else f"amplification {amp:.3g}×"
            _tip(fig, bar, f"{r['label']}\n{what}; verdict {r.get('verdict')}")
    ax.axvline(1.0, color="#1d2330", lw=0.8)
    if gate:
        ax.axvline(gate, color="#d62728", ls="--", lw=0.9, label=f"gate {gate:g}x")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    _log_labels(ax.xaxis, lambda v: f"{v:g}×")
    ax.set_xlim(lo, hi * 1.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=6.5)
    ax.invert_yaxis()
    ax.set_xlabel("SLA amplification v_B / v_A (violations of τ)")
    ax.set_title(_wrap(title, 110), fontsize=9)
    ax.grid(axis="x", which="both", alpha=0.2)
    return _svg(fig)


# -- fleet report ----------------------------------------------------------------------
def fleet_outliers(nodes: list[str], points: list[dict], threshold: float, title: str, clip: float = 10.0) -> str:
    """Robust z of every metric per node (jittered strip), |z| beyond ``clip`` drawn at
    the clip with a triangle; flagged metrics red; ±threshold dashed. ``points``: {node,
    z, flagged[, label]}: ``label`` (case and metric) leads each point's hover title."""
    fig = _figure(max(6.0, 0.9 * len(nodes) + 3.0), 4.2)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    index = {n: i for i, n in enumerate(nodes)}
    for p in points:
        z = p["z"]
        if z is None or (isinstance(z, float) and math.isnan(z)):
            continue
        x = index[p["node"]] + rng.uniform(-0.25, 0.25)
        clipped = max(-clip, min(clip, z))
        marker = "o" if abs(z) <= clip else ("^" if z > 0 else "v")
        dot = ax.scatter([x], [clipped], s=14 if p["flagged"] else 8, marker=marker,
                         color="#d62728" if p["flagged"] else "#2456a6", alpha=0.9 if p["flagged"] else 0.45,
                         edgecolors="none")
        _tip(fig, dot, f"{p.get('label') or p['node']}\nnode {p['node']}: robust z {z:.3g}"
                       + (" (flagged)" if p["flagged"] else ""))
    for t in (threshold, -threshold):
        ax.axhline(t, color="#d62728", ls="--", lw=0.9)
    ax.scatter([], [], s=14, color="#d62728", label=f"flagged |z| > {threshold:g}")
    ax.scatter([], [], s=8, color="#2456a6", alpha=0.45, label="within")
    ax.scatter([], [], s=14, marker="^", color="#777777", label=f"beyond ±{clip:g} (clipped)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.axhline(0, color="#1d2330", lw=0.6)
    ax.set_xticks(range(len(nodes)))
    ax.set_xticklabels([_wrap(n, 16) for n in nodes], rotation=0, ha="center", fontsize=7.5)
    ax.set_ylim(-clip * 1.1, clip * 1.1)
    ax.set_ylabel(f"robust z (clipped at ±{clip:g})")
    ax.set_title(_wrap(title, 110), fontsize=9)
    ax.grid(axis="y", alpha=0.2)
    return _svg(fig)


def fleet_capacity(nodes: list[dict], title: str) -> str:
    """C_eff and C_nom (tokens/s) per node, nodes grouped by device class; ε on top.
    ``nodes``: {node, class, C_eff, C_nom, epsilon}; each bar's hover title is the node
    with both capacities."""
    fig = _figure(max(6.0, 0.9 * len(nodes) + 3.0), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(nodes))
    ceff = [n["C_eff"] or 0.0 for n in nodes]
    cnom = [n["C_nom"] or 0.0 for n in nodes]
    nom_bars = ax.bar(x - 0.2, cnom, width=0.4, color="#c8cfdc", label="C_nom (nominal)")
    eff_bars = ax.bar(x + 0.2, ceff, width=0.4, color="#2456a6", label="C_eff (effective)")
    for n, b_nom, b_eff in zip(nodes, nom_bars, eff_bars):
        figures = (f"C_eff {_fmt_si(n['C_eff'], 'tok/s') if n['C_eff'] is not None else '—'}, "
                   f"C_nom {_fmt_si(n['C_nom'], 'tok/s') if n['C_nom'] is not None else '—'}"
                   + (f", ε {n['epsilon']:.3g}" if n.get("epsilon") is not None else ""))
        for bar in (b_nom, b_eff):
            _tip(fig, bar, f"{n['node']} ({n['class']})\n{figures}")
    for xi, n in zip(x, nodes):
        eps = n.get("epsilon")
        if eps is not None:
            ax.text(xi, max(n["C_nom"] or 0, n["C_eff"] or 0), f"ε {eps:.3g}", ha="center", va="bottom", fontsize=7)
    prev = None
    for xi, n in zip(x, nodes):
        if n["class"] != prev:
            ax.axvline(xi - 0.5, color="#999999", lw=0.6)
            ax.text(xi - 0.45, 1.0, _wrap(n["class"], 30), transform=ax.get_xaxis_transform(), fontsize=7,
                    va="bottom", ha="left", color="#505a6b")
            prev = n["class"]
    ax.set_xticks(x)
    ax.set_xticklabels([_wrap(n["node"], 16) for n in nodes], rotation=0, ha="center", fontsize=7.5)
    ax.set_ylabel("tokens/s")
    ax.set_title(_wrap(title, 110), fontsize=9, pad=16)
    ax.grid(axis="y", alpha=0.2)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _svg(fig)
