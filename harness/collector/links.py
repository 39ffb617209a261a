"""The pairwise link matrix (INDICATORS.md mode 3): which link or which node is slow.

Input: the N × N matrix a ``collective.pairwise`` case keeps in its ``extra``
(``matrix_Bps[i][j]`` = bytes/s from rank i to rank j, per direction, row = sender,
None on the diagonal and wherever a pair was not measured). The figures, with
θ = ``accessible_theta`` (0.5 by default):

- a node's bandwidth to the group b_i = the median of its measured links, both
  directions (row i and column i: 2(N − 1) values when complete);
- the group median B = the median over nodes of b_i (robust to one slow node: in a
  4-rank group a slow node touches half of the 12 links, so the median of the links
  themselves would sit between slow and fast);
- a link i → j is flagged when b_ij < θ × B; a node is slow when b_i < θ × B (most of its
  links are slow); a slow link is a flagged link neither of whose ends is a slow node
  (one bad pair, not a bad node);
- the accessible capacity fraction = the share of nodes with b_i ≥ θ × B
  (:func:`harness.collector.formulas.accessible_fraction` over the b_i).

The pairwise idea (one figure per pair instead of one per group, to find the culprit)
follows the peer-to-peer matrices of NVIDIA's nvbandwidth and of nccl-tests' sendrecv
run pair by pair; the round-robin schedule that measures them in N − 1 rounds is in
probes/collective.py (``round_robin``).
"""

from __future__ import annotations

import math

import numpy as np


def _value(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def matrix_array(matrix) -> np.ndarray:
    """The matrix as an N × N float array, NaN where unmeasured (None, non-finite, ≤ 0)
    and on the diagonal. Raises ValueError when it is not square (a damaged extra)."""
    rows = list(matrix or [])
    n = len(rows)
    if n < 2 or any(not isinstance(r, (list, tuple)) or len(r) != n for r in rows):
        raise ValueError(f"a link matrix must be square with at least 2 rows, got {n} row(s)")
    out = np.full((n, n), np.nan)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            x = _value(v)
            if i != j and x is not None:
                out[i, j] = x
    return out


def link_findings(matrix, theta: float = 0.5, labels: list[str] | None = None) -> dict:
    """Slow links, slow nodes and the accessible fraction of one link matrix.

    ``matrix``: N × N B/s (row = sender), see the module docstring; ``labels``: a name
    per rank (``rank 2 (host)``), default ``rank i``. Returns {"group_median_Bps",
    "theta", "node_Bps" (b_i, None where a node has no measured link), "node_ratio",
    "links" (every measured link: src, dst, Bps, ratio, flagged), "flagged_links",
    "slow_nodes" (rank indices), "slow_links" (flagged links between nodes that are
    not slow), "slowest_link", "slowest_node" (each {…, ratio}), "accessible_fraction"}.
    Raises ValueError for a matrix that is not square or has no measured link."""
    m = matrix_array(matrix)
    n = m.shape[0]
    labels = list(labels) if labels and len(labels) == n else [f"rank {i}" for i in range(n)]
    node = []
    for i in range(n):
        mine = np.concatenate([m[i, :], m[:, i]])
        mine = mine[np.isfinite(mine)]
        node.append(float(np.median(mine)) if mine.size else None)
    measured = [b for b in node if b is not None]
    if not measured:
        raise ValueError("the link matrix has no measured link")
    group = float(np.median(measured))
    links = []
    for i in range(n):
        for j in range(n):
            if np.isfinite(m[i, j]):
                ratio = float(m[i, j]) / group
                links.append({"src": i, "dst": j, "link": f"{labels[i]} → {labels[j]}", "Bps": float(m[i, j]),
                              "ratio": ratio, "flagged": ratio < theta})
    slow_nodes = [i for i, b in enumerate(node) if b is not None and b < theta * group]
    flagged = [x for x in links if x["flagged"]]
    slow_links = [x for x in flagged if x["src"] not in slow_nodes and x["dst"] not in slow_nodes]
    worst_link = min(links, key=lambda x: x["Bps"])
    worst_node = min((i for i in range(n) if node[i] is not None), key=lambda i: node[i])
    from harness.collector.formulas import accessible_fraction

    return {
        "group_median_Bps": group,
        "theta": theta,
        "labels": labels,
        "node_Bps": node,
        "node_ratio": [None if b is None else b / group for b in node],
        "links": links,
        "flagged_links": [(x["src"], x["dst"]) for x in flagged],
        "slow_nodes": slow_nodes,
        "slow_links": [(x["src"], x["dst"]) for x in slow_links],
        "slowest_link": worst_link,
        "slowest_node": {"rank": worst_node, "node": labels[worst_node], "Bps": node[worst_node],
                         "ratio": node[worst_node] / group},
        "accessible_fraction": accessible_fraction({i: b for i, b in enumerate(node) if b is not None}, theta),
    }


def rank_labels(extra: dict) -> list[str] | None:
    """``rank i (host, device)`` per rank from a pairwise case's extra; None when the
    case does not name its ranks' hosts."""
    hosts, devices = extra.get("hosts"), extra.get("devices")
    if not isinstance(hosts, list):
        return None
    out = []
    for i, host in enumerate(hosts):
        dev = devices[i] if isinstance(devices, list) and i < len(devices) else None
        out.append(f"rank {i} ({host}{', ' + str(dev) if dev else ''})")
    return out


def report_inputs(cases, doc: dict | None = None) -> dict | None:
    """What the run report draws (harness.report.plots.link_matrix) for a run's
    ``cases`` table (pandas DataFrame of cases.parquet): the matrix of the case mode 3
    used (``doc["mode3"]["slowest_link"]["matrix_case"]`` of indicators.json), else of
    the ok ``collective.pairwise`` case with the most ranks; with θ from ``doc``'s
    config (0.5 without). None when the run has no usable matrix."""
    from harness.results import json_object

    if cases is None or not len(cases) or not {"probe", "status", "case_id"} <= set(cases.columns):
        return None
    rows = cases[(cases["probe"] == "collective.pairwise") & (cases["status"] == "ok")]
    if not len(rows):
        return None
    doc = doc or {}
    theta = float(((doc.get("config") or {}).get("accessible_theta")) or 0.5)
    wanted = ((doc.get("mode3") or {}).get("slowest_link") or {}).get("matrix_case")
    picked = rows[rows["case_id"] == wanted] if wanted else rows.iloc[0:0]
    if not len(picked):
        keys = [k for k in ("world_size", "bytes") if k in rows.columns]
        picked = rows.sort_values(keys).iloc[[-1]] if keys else rows.iloc[[0]]
    row = picked.iloc[0]
    extra = json_object(row.get("extra"))
    try:
        found = link_findings(extra.get("matrix_Bps"), theta, rank_labels(extra))
    except ValueError:
        return None
    size = extra.get("size_bytes")
    caption = (f"{row['case_id']}: B/s per direction at the median transfer time (row = sender); red frames: links "
               f"below θ = {theta:g} × the group median ({found['group_median_Bps'] / 1e9:.3g} GB/s); red labels: "
               f"slow nodes ({', '.join(found['labels'][k] for k in found['slow_nodes']) or 'none'})")
    return {"case_id": str(row["case_id"]), "matrix": extra["matrix_Bps"], "labels": found["labels"],
            "flagged": [list(p) for p in found["flagged_links"]], "slow_nodes": found["slow_nodes"],
            "title": f"pairwise link matrix — {len(found['labels'])} ranks, {size} bytes per transfer",
            "caption": caption}
