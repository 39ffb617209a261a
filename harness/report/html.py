"""The HTML page of a report: one self-contained file, no network needed to view it.

Every text that comes from a run (case ids, reasons, fingerprint facts) goes through
:func:`esc` (``html.escape``). The page carries a Content-Security-Policy that forbids
every external resource and every script (``default-src 'none'``; inline styles and
``data:`` images only), so a report that tried to load anything would show it as a
blocked request instead of silently depending on the network.

Plots are ``<figure class="plot" data-plot="KIND">`` elements holding an inline SVG
(``data-state="ok"``), the one number a plot would hold (``"value"``: a 1×1 heatmap), or
the reason there is none (``data-state="empty"``: the run has no such cases;
``"unavailable"``: matplotlib is missing; ``"error"``: the plot failed, with the error).

Every table sits in a box that scrolls sideways (``.tablewrap``), so no table widens
the page or is clipped at any window width.
"""

from __future__ import annotations

import html
import json
import math

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#fff;font-size:14px;line-height:1.4;overflow-wrap:break-word}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0 0 4px 0;font-size:20px}
header .meta{color:#c8cfdc;font-size:13px}
nav{padding:6px 24px;background:#eef1f6;font-size:13px;position:sticky;top:0;z-index:2;border-bottom:1px solid #d5dbe6}
nav a{margin-right:14px;color:#2456a6;text-decoration:none}
main{padding:8px 24px 40px 24px;max-width:1500px}
section{margin-top:22px}
h2{font-size:17px;border-bottom:2px solid #d5dbe6;padding-bottom:3px;margin-bottom:8px}
h3{font-size:15px;margin:14px 0 6px 0}
table{border-collapse:collapse;margin:6px 0 10px 0;font-size:12.5px}
th,td{border:1px solid #d5dbe6;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f9;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.num.wrap{white-space:normal;min-width:7em}
td.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;word-break:break-all;max-width:560px;min-width:16em}
td.reason{white-space:pre-wrap;max-width:640px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:11.5px;font-weight:600;white-space:nowrap}
.v-ok,.v-improved,.s-ok{background:#d9f2df;color:#11602a}
.v-warn,.s-skipped{background:#fff1c7;color:#7a5800}
.v-fail,.v-regressed,.s-failed,.s-timeout{background:#fbd9d9;color:#8f1111}
.v-info{background:#dcebfb;color:#16497f}
.v-not-measurable,.v-not-judged,.v-unchanged{background:#eceef2;color:#505a6b}
figure.plot{margin:10px 0 16px 0;padding:8px;border:1px solid #d5dbe6;border-radius:4px;display:inline-block;vertical-align:top;max-width:100%;box-sizing:border-box}
figure.plot svg{max-width:100%;height:auto;display:block}
figure.plot figcaption{font-size:12.5px;color:#3a4456;margin-top:4px;max-width:1100px;contain:inline-size}
figure.plot[data-state="empty"],figure.plot[data-state="unavailable"],figure.plot[data-state="error"]{background:#f7f8fb;color:#505a6b;min-width:320px}
figure.plot .why{font-style:italic;padding:18px 8px}
.headline{font-size:15px;margin:6px 0}
.headline b{font-size:17px}
.note{color:#505a6b;font-size:12.5px}
.emulated{display:inline-block;padding:0 5px;border-radius:8px;font-size:11px;background:#f3e3fa;color:#6a1b7a;cursor:help}
details{margin:4px 0}
summary{cursor:pointer;color:#2456a6}
.kv{display:grid;grid-template-columns:max-content auto;gap:1px 14px;font-size:12.5px}
.kv div:nth-child(odd){color:#505a6b}
.kv div{overflow-wrap:anywhere;min-width:0}
.tablewrap{overflow-x:auto;max-width:100%;margin:6px 0 10px 0}
.tablewrap>table{margin:0}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0}
td{overflow-wrap:break-word}
td li .mono,td pre{word-break:break-all}
main{box-sizing:border-box}
.verdict{border:1px solid #d5dbe6;border-left-width:6px;border-radius:4px;padding:8px 14px;margin:10px 0 6px 0;background:#fafbfd}
.verdict.o-PASS{border-left-color:#2f9e4f}
.verdict.o-WARN{border-left-color:#d9a400}
.verdict.o-FAIL{border-left-color:#c62828}
.verdict .overall{font-size:22px;font-weight:700;margin-right:12px}
.verdict.o-PASS .overall{color:#11602a}
.verdict.o-WARN .overall{color:#7a5800}
.verdict.o-FAIL .overall{color:#8f1111}
.verdict ol{margin:6px 0 2px 0;padding-left:22px}
.verdict li{margin:2px 0}
.bignum{padding:14px 18px}
.bignum .value{font-size:30px;font-weight:700;font-variant-numeric:tabular-nums}
.bignum .what{color:#505a6b;font-size:13px}
"""


def esc(value) -> str:
    """Any value as escaped HTML text (None -> an em dash)."""
    if value is None:
        return "—"
    return html.escape(str(value), quote=True)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def num(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if not is_num(v):
        return esc(v)
    return f"{float(v):.{digits}g}"


def si(value, unit: str) -> str:
    """1.23e11, 'B/s' -> '123 GB/s' (decimal prefixes; harness.units.fmt)."""
    from harness.units import fmt

    return fmt(float(value), unit) if is_num(value) else "—"


def seconds(value) -> str:
    """Seconds with their prefix (harness.units.fmt), a typographic minus when negative."""
    from harness.units import fmt

    if not is_num(value):
        return "—"
    value = float(value)
    return ("−" if value < 0 else "") + fmt(abs(value), "s")


def pct(v) -> str:
    return f"{float(v):.1%}" if is_num(v) else "—"


def value_text(value, unit: str | None) -> str:
    """An indicator value in its unit, as plain text."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)[:200]
    if unit == "s":
        return seconds(value)
    if unit in ("tokens/s",):
        return si(value, "tok/s")
    if unit in ("B/s", "FLOP/s"):
        return si(value, unit)
    return num(value)


def badge(text: str, kind: str = "v") -> str:
    cls = f"{kind}-" + str(text).replace(" ", "-")
    return f'<span class="badge {esc(cls)}">{esc(text)}</span>'


def table(headers: list[str], rows: list[list[str]], cls: list[str] | None = None, attrs: str = "") -> str:
    """A table; ``rows`` hold ready HTML cells, ``cls`` per-column td classes.

    The table sits in its own ``<div class="tablewrap">`` (``overflow-x: auto``): a table
    wider than the page (many columns, long case ids) scrolls inside that box instead of
    widening the page or being clipped; a narrower one looks the same as without it."""
    cls = cls or [""] * len(headers)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="{c}">{cell}</td>' if c else f"<td>{cell}</td>" for c, cell in zip(cls, row))
        body.append(f"<tr>{cells}</tr>")
    return (f'<div class="tablewrap"><table{(" " + attrs) if attrs else ""}><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def verdict_block(summary: dict | None, error: str = "") -> str:
    """The verdict that opens a report: overall PASS / WARN / FAIL, the counts per
    verdict and the largest findings, one sentence each.

    ``summary`` is :func:`harness.headline.verdict_summary`'s dict ({"overall",
    "counts", "findings"}); when it is None, ``error`` says why there is no verdict (the
    block is still there, first, so a reader is never left to guess)."""
    if not summary:
        return (f'<div class="verdict" data-verdict="unknown"><span class="overall">no verdict</span>'
                f'{esc(error or "the verdict could not be computed")}</div>')
    overall = str(summary.get("overall") or "?")
    c = summary.get("counts") or {}
    cases = [(k, c.get(f"cases_{k}")) for k in ("ok", "failed", "skipped")]
    inds = [(k.replace("_", " "), c.get(k)) for k in ("pass", "warn", "fail", "info", "not_measurable", "not_judged")]
    badge_of = {"ok": "ok", "failed": "failed", "skipped": "skipped"}
    case_txt = " ".join(f'{badge(badge_of[k], "s")} {esc(v)}' for k, v in cases if v is not None)
    ind_txt = " ".join(('<span class="badge v-ok">pass</span>' if k == "pass" else badge(k)) + f" {esc(v)}" for k, v in inds
                       if v is not None and (v or k in ("pass", "warn", "fail")))
    findings = summary.get("findings") or []
    items = "".join(f"<li>{esc(f)}</li>" for f in findings)
    return (f'<div class="verdict o-{esc(overall)}" data-verdict="{esc(overall)}">'
            f'<span class="overall">{esc(overall)}</span>'
            f'<span class="counts">cases {case_txt} · indicators {ind_txt}</span>'
            + (f'<ol class="findings">{items}</ol>' if items else '<p class="note">no finding</p>') + "</div>")


def single_value(kind: str, title: str, value_text: str, what: str, tip: str, caption: str = "",
                 attrs: dict | None = None) -> str:
    """A plot that would have one cell (a 1×1 heatmap) shown as the number it holds:
    ``<figure data-plot=KIND data-state="value">`` with the value, what it is, and
    ``tip`` (case id and figures) as the hover title."""
    extra = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())
    cap = f"<figcaption><b>{esc(title)}</b>{(' — ' + caption) if caption else ''}</figcaption>"
    return (f'<figure class="plot" data-plot="{esc(kind)}" data-state="value"{extra}>'
            f'<div class="bignum" title="{esc(tip)}"><div class="value">{esc(value_text)}</div>'
            f'<div class="what">{esc(what)}</div></div>{cap}</figure>')


def kv_grid(pairs: list[tuple[str, str]]) -> str:
    """Label/value pairs (values ready HTML)."""
    return '<div class="kv">' + "".join(f"<div>{esc(k)}</div><div>{v}</div>" for k, v in pairs) + "</div>"


def details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>{body}</details>"


def figure(kind: str, title: str, svg: str | None = None, why: str | None = None, caption: str = "",
           state: str | None = None, attrs: dict | None = None) -> str:
    """One plot: the SVG, or why there is none. ``kind`` is the stable ``data-plot``
    name the tests look for; ``attrs`` adds ``data-*`` attributes (device, family...)."""
    state = state or ("ok" if svg else "empty")
    extra = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in (attrs or {}).items())
    inner = svg if svg else f'<div class="why">{esc(why or "no data")}</div>'
    cap = f"<figcaption><b>{esc(title)}</b>{(' — ' + caption) if caption else ''}</figcaption>"
    return f'<figure class="plot" data-plot="{esc(kind)}" data-state="{esc(state)}"{extra}>{inner}{cap}</figure>'


def page(title: str, subtitle: str, nav: list[tuple[str, str]], sections: list[tuple[str, str, str]],
         generator: str) -> str:
    """The whole document. ``sections``: (anchor id, heading, body HTML)."""
    links = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in nav)
    body = "".join(f'<section id="{esc(a)}"><h2>{esc(h)}</h2>{content}</section>' for a, h, content in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{esc(generator)}">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body><header><h1>{esc(title)}</h1><div class="meta">{subtitle}</div></header>'
        f"<nav>{links}</nav><main>{body}</main></body></html>\n"
    )
