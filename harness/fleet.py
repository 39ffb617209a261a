"""Fleet view (INDICATORS.md §4): many runs, one per node, compared within device class.

Key metrics, per ``ok`` case of each run (cases selected by ``fleet.cases`` globs):

- ``p50_s`` — the case's median repetition time (cases.parquet ``p50_s``);
- ``best_rate`` — the case's best-sample rate in the unit of its bound:
  ``best_busbw_Bps`` for collectives, ``best_flops_per_s`` for compute-bound cases,
  ``best_bytes_per_s`` for memory/link-bound ones; latency cases have none.

and per run, from indicators.json when present: ``epsilon`` (ε = C_eff/C_nom),
``C_eff`` and ``C_nom`` (see :func:`harness.results.capacity_figures`).

Metric flags and node flags. Every (class, case, metric) value with |z| > threshold is
listed as a flagged metric. A node is flagged (``node_rule: family-median``, default)
when a run-level indicator (ε, C_eff, C_nom: one value per node) has |z| > threshold, or
when, for some probe family (memory, gemm, decode, ...), the median |z| of the node's
metrics in that family exceeds the threshold — i.e. most of the family is off, as a
slow memory channel, a throttled GPU or a noisy neighbour make it. One odd case (a
lucky best sample, one bimodal kernel) is listed but does not flag the node: with tens
of metrics per node, "any metric beyond 3.5" flags most healthy nodes of a small fleet
(on this project's 2-core VM, 3 of 5 unperturbed nodes). ``node_rule: any`` restores
that rule.

A case metric belongs to the device class of the case's device (manifest
``devices[].name``; a device group takes its first device's class); a run-level
indicator to the run's set of classes. Within each (class, case, metric) group over the
nodes that have it, the robust z-score is ``z = (x − median) / (1.4826 · MAD)``, and
|z| > ``z_threshold`` (3.5) flags the metric and its node.

The scale has a floor: ``max(1.4826 · MAD, r · |median|)`` with r the larger of
``min_scale_rel`` (config, default 0.02: nothing within 3.5 × 2 % = 7 % of the class
median is flagged) and, with ``pool_scale: family`` (default), the node-to-node noise
known from the other cases: the median relative spread 1.4826·MAD/|median| over the
cases of the same probe family, or over all cases of the class when that is larger
(:func:`_group_stats`; the column ``scale_source`` says which set the scale). Without
a floor a fleet of nodes that differ only by measurement noise gets flagged: the MAD of
six values is itself so noisy that about one Gaussian metric in seven has some
|z| > 3.5, a node has tens of metrics, and on a noisy machine four of six runs can agree
on a case by chance while run-to-run swings of 20-50 % are normal (this project's
2-core VM). Set ``min_scale_rel: 0`` and ``pool_scale: none`` for the bare formula. When the scale is 0 (MAD 0 — half or more of the nodes identical —
and no floor, or a median of 0) z is 0 for a node at the median and ±inf (flagged) for
any other value; never a division by zero. With fewer than 3 nodes in a group the
z-scores are computed but carry little meaning.

Per-node round variance (issue 18). A node's ``p50_s`` from a run of K ≥ 2 rounds is
uncertain by its own between-round spread: se = sd(log per-round p50, ddof 1)/sqrt(K)
(cases.parquet ``round_p50_s``; relative, column ``round_se_rel``). Its z divides by
the fleet scale and the node's own uncertainty in quadrature,
``z = (x − median) / sqrt(scale² + (se · |median|)²)`` — the same noise a comparison of
two runs takes from the spread between rounds (harness.compare): a node whose rounds
disagree by 30 % is not flagged for a 20 % offset. Runs without rounds (or with one)
have no se (NaN) and keep the plain formula; ``best_rate`` is a best sample, not a
per-round figure, and has none either.

Fleet effective capacity: Σ C_eff against Σ C_nom over the nodes that report both;
"not measurable" when none does. With ``price_per_device_hour`` (a number, or a mapping
of device-class glob to a number) the cost per effective token is
Σ (price × devices) per second / Σ C_eff, next to the cost per nominal token.
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import UserError
from harness.results import Run, capacity_figures

MAD_SCALE = 1.4826
NODE_TABLE_MAX = 50   # more nodes: the terminal lists the flagged ones only
FLAG_TABLE_MAX = 100  # flagged metrics printed, largest |z| first
RUN_FAMILY = "run"  # the family of run-level indicators (ε, C_eff, C_nom)
LONG_COLUMNS = ["run_id", "host", "label", "path", "device_class", "family", "case_id", "metric", "unit", "value",
                "round_se_rel", "n_nodes", "median", "mad", "scale", "scale_floor_rel", "scale_source", "z", "flagged"]
STAT_COLUMNS = ("n_nodes", "median", "mad", "scale", "scale_floor_rel", "scale_source", "z", "flagged")


def round_se_rel(row: dict) -> float:
    """Relative standard error of a case's pooled p50 from its rounds: sd (ddof 1) of the
    log per-round p50 (``round_p50_s``, JSON text list) over sqrt(K); NaN with fewer than
    two rounds, a missing or malformed list, or a non-positive p50."""
    import json

    text = row.get("round_p50_s")
    if not isinstance(text, str):
        return math.nan
    try:
        values = [float(v) for v in json.loads(text) if v is not None]
    except (ValueError, TypeError):
        return math.nan
    if len(values) < 2 or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        return math.nan
    return float(np.std(np.log(values), ddof=1) / math.sqrt(len(values)))


def _price_of(cls: str, price) -> float | None:
    if price is None:
        return None
    if isinstance(price, dict):
        for glob, p in price.items():
            if fnmatch.fnmatchcase(cls, glob):
                return float(p)
        return None
    return float(price)


# -- loading: only what the fleet view needs ---------------------------------------------
#: cases.parquet columns the fleet view reads (the rest, and samples/telemetry, never).
CASE_COLUMNS = ["case_id", "family", "device", "status", "bound", "p50_s", "round_p50_s", "best_busbw_Bps",
                "best_flops_per_s", "best_bytes_per_s"]
_STRING_COLUMNS = ("case_id", "family", "device", "status", "bound", "round_p50_s")
SE_CHUNK = 100_000  # rows per JSON parse of round_p50_s (memory stays bounded)
SCAN_CHUNK = 256     # cases.parquet files per pyarrow dataset scan


def _case_schema():
    import pyarrow as pa

    return pa.schema([(c, pa.string() if c in _STRING_COLUMNS else pa.float64()) for c in CASE_COLUMNS])


def node_info(run_id: str, path: Path | str, manifest: dict, indicators: dict | None, f: dict) -> dict:
    """What the fleet view keeps of one node besides its cases: ids, status, device
    classes, capacity figures (:func:`node_capacity`) and price per hour."""
    # Only what device classes need: a whole manifest (the environment fingerprint) is a
    # few hundred kB of Python objects, which 10,000 nodes cannot all keep.
    devices = [{"id": d.get("id"), "name": d.get("name"),
                "nominal": {"device_class": (d.get("nominal") or {}).get("device_class")}
                if isinstance(d.get("nominal"), dict) else {}}
               for d in manifest.get("devices") or [] if isinstance(d, dict)]
    light = {"run_id": manifest.get("run_id"), "host": manifest.get("host"), "label": manifest.get("label"),
             "devices": devices}
    probe = Run(path=Path(path), manifest=light, cases=pd.DataFrame(), samples=pd.DataFrame())
    classes = probe.device_classes()
    caps = node_capacity(indicators)
    price = None
    if f["price_per_device_hour"] is not None:
        prices = [_price_of(c, f["price_per_device_hour"]) for c in classes.values()]
        price = sum(prices) if prices and all(p is not None for p in prices) else None
    return {"run_id": str(run_id), "host": probe.host, "label": probe.label, "path": str(path),
            "status": manifest.get("status"), "device_classes": " + ".join(sorted(set(classes.values()))) or "unknown",
            "devices": len(classes), "indicators": indicators is not None, "C_eff": caps["C_eff"],
            "C_nom": caps["C_nom"], "epsilon": caps["epsilon"], "price_per_hour": price, "_run": probe}


def _node_cases_one(path: Path) -> pd.DataFrame:
    """One node's cases (:data:`CASE_COLUMNS` present), checked: cases.parquet of a
    complete run, the journal of a partial one (harness.store). Raises UserError naming
    the damaged file."""
    import pyarrow.parquet as pq

    from harness.errors import UserError
    from harness.store import check_cases_frame, read_cases

    table = Path(path) / "cases.parquet"
    if not table.exists():
        cases = read_cases(path)
    else:
        try:
            names = set(pq.read_schema(table).names)
            cases = pq.read_table(table, columns=[c for c in CASE_COLUMNS if c in names]).to_pandas()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise UserError(f"{table}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        cases = check_cases_frame(cases, table)
    return cases[[c for c in CASE_COLUMNS if c in cases.columns]]


def _scan_cases(files: list[str]) -> pd.DataFrame | None:
    """The :data:`CASE_COLUMNS` of many cases.parquet files in one pyarrow dataset scan
    (threads, only those columns; a column a file lacks reads as null), with ``_file``
    the file each row came from; None when the scan fails (a damaged or ill-typed file:
    the caller then reads file by file to name it)."""
    import pyarrow.dataset as ds

    if not files:
        return pd.DataFrame(columns=[*CASE_COLUMNS, "_file"])
    schema = _case_schema()
    try:
        parts, names = [], []
        # In chunks: a dataset keeps each file's Parquet metadata (~0.2 MB for a run's
        # 50-column table) until it is dropped; one dataset of 10,000 files would hold 2 GB.
        for start in range(0, len(files), SCAN_CHUNK):
            dataset = ds.dataset(files[start:start + SCAN_CHUNK], format="parquet", schema=schema)
            for tagged in dataset.scanner(columns=schema.names).scan_batches():
                batch = tagged.record_batch
                if batch.num_rows:
                    parts.append(batch)
                    names.append((tagged.fragment.path, batch.num_rows))
            del dataset
    except Exception:  # noqa: BLE001 - any unreadable file: fall back to one by one
        return None
    import pyarrow as pa

    if not parts:
        return pd.DataFrame(columns=[*CASE_COLUMNS, "_file"])
    table = pa.Table.from_batches(parts, schema=schema)
    del parts
    # round_p50_s becomes its se (float) chunk by chunk, and the other text columns
    # categories: no Python string per row for a fleet's millions of rows.
    rounds = table.column("round_p50_s")
    se = np.concatenate([round_se_rels(rounds.slice(i, SE_CHUNK).to_pylist())
                         for i in range(0, len(rounds), SE_CHUNK)])
    df = table.drop_columns(["round_p50_s"]).to_pandas(strings_to_categorical=True)
    df["round_se_rel"] = se
    df["_file"] = pd.Categorical.from_codes(np.repeat(np.arange(len(names)), [k for _, k in names]),
                                            categories=pd.Index([n for n, _ in names]).unique()) \
        if len({n for n, _ in names}) == len(names) else pd.Categorical(np.repeat([n for n, _ in names],
                                                                                   [k for _, k in names]))
    return df


def _checked_scan(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The rows of files that pass :func:`harness.store.check_cases_frame`'s rules
    (case ids present and unique, known statuses), checked for all files at once; and
    {file: reason} for the files that do not."""
    from harness.store import CASE_STATUSES

    bad: dict[str, str] = {}
    files = df["_file"].astype(str)
    for mask, why in ((df["case_id"].isna(), "case_id holds values that are not strings"),
                      (df["status"].isna(), "a case has no status"),
                      (~df["status"].isin(CASE_STATUSES) & df["status"].notna(),
                       f"a status is not one of {', '.join(CASE_STATUSES)}"),
                      (df.duplicated(["_file", "case_id"]) & df["case_id"].notna(), "a case id appears more than once")):
        for file in files[mask].unique():
            bad.setdefault(file, f"{file}: {why}")
    if bad:
        df = df[~files.isin(list(bad))]
    return df, bad


def fleet_view_paths(paths: list[Path], cfg: dict) -> dict:
    """:func:`fleet_view` of the run folders ``paths`` (one per node), reading only what
    it needs: each node's manifest.json and indicators.json (checked, one node at a
    time, kept as a few figures) and the :data:`CASE_COLUMNS` of every cases.parquet in
    one pyarrow dataset scan — never samples or telemetry, so 10,000 nodes cost their
    summaries. A node whose folder is missing, damaged or of a newer schema is listed in
    ``skipped`` with its reason and the view goes on."""
    from harness.errors import UserError
    from harness.results import RawRun, migrate, read_indicators
    from harness.store import read_manifest

    f = cfg["fleet"]
    infos, skipped, scan, journal = [], [], [], []
    seen_ids: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        try:
            manifest = read_manifest(path)
            indicators = read_indicators(path)
            migrate(RawRun(manifest["schema_version"], manifest, pd.DataFrame(columns=["case_id", "n"]),
                           pd.DataFrame(), pd.DataFrame(), indicators), str(path / "manifest.json"))
        except UserError as exc:
            skipped.append({"path": str(path), "run_id": path.name, "reason": str(exc)})
            continue
        run_id = str(manifest.get("run_id") or path.name)
        if run_id in seen_ids:
            # A copy of one run (same run id) would count one node twice and pull the
            # class median towards it.
            skipped.append({"path": str(path), "run_id": path.name,
                            "reason": f"same run id {run_id} as {seen_ids[run_id]}: one run counts once"})
            continue
        seen_ids[run_id] = str(path)
        info = node_info(run_id, path, manifest, indicators, f)
        info["_index"] = len(infos)
        infos.append(info)
        table = path / "cases.parquet"
        (scan if manifest.get("status") == "complete" and table.exists() else journal).append(info)
    frames = []
    df = _scan_cases([str(Path(i["path"]) / "cases.parquet") for i in scan])
    if df is None:  # a damaged file somewhere: read file by file
        journal = scan + journal
    else:
        df, bad = _checked_scan(df)
        index = {str(Path(i["path"]) / "cases.parquet"): i["_index"] for i in scan}
        df["_node"] = df["_file"].astype(str).map(index).astype(np.int64)
        frames.append(df.drop(columns=["_file"]))
        for file, reason in bad.items():
            info = infos[index[file]]
            info["_dropped"] = reason
    for info in journal:
        try:
            frames.append(_node_cases_one(Path(info["path"])).assign(_node=info["_index"]))
        except UserError as exc:
            info["_dropped"] = str(exc)
    kept = [i for i in infos if "_dropped" not in i]
    skipped += [{"path": i["path"], "run_id": Path(i["path"]).name, "reason": i["_dropped"]}
                for i in infos if "_dropped" in i]
    renumber = {i["_index"]: k for k, i in enumerate(kept)}
    cases = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*CASE_COLUMNS, "_node"])
    cases = cases[cases["_node"].isin(list(renumber))]
    cases["_node"] = cases["_node"].map(renumber).astype(np.int64)
    return _view(kept, cases, cfg, skipped)


def fleet_view(runs, cfg: dict, skipped: list[dict] | None = None) -> dict:
    """The fleet view of ``runs`` (harness.results.Run objects, one per node) under
    ``cfg["fleet"]`` (module doc); for run folders use :func:`fleet_view_paths`, which
    reads only the summaries. ``skipped``: nodes that could not be loaded, listed with
    their reasons. Returns a dict: nodes (one per run, with flag reasons), flagged_nodes,
    flags (flagged rows), capacity, classes, skipped, and ``long`` (the metric table,
    LONG_COLUMNS)."""
    f = cfg["fleet"]
    infos, frames = [], []
    for k, run in enumerate(runs):
        infos.append(node_info(run.run_id, run.path, run.manifest, run.indicators, f))
        cols = [c for c in CASE_COLUMNS if c in run.cases.columns]
        frames.append(run.cases[cols].assign(_node=k))
    cases = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*CASE_COLUMNS, "_node"])
    return _view(infos, cases, cfg, skipped)


def node_capacity(doc: dict | None) -> dict[str, float | None]:
    """ε, C_eff, C_nom of a run (:func:`harness.results.capacity_figures`), read straight
    from the ``capacity`` section when it holds all three as numbers (the collector's
    layout; the nearest-the-top rule gives the same leaves), else by walking the whole
    indicators.json — thousands of leaves, which a 10,000-node fleet pays 10,000 times."""
    cap = doc.get("capacity") if isinstance(doc, dict) else None
    if isinstance(cap, dict) and not any(k in doc for k in ("C_eff", "C_nom", "epsilon")):
        vals = {k: cap.get(k) for k in ("epsilon", "C_eff", "C_nom")}
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals.values()):
            return {k: float(v) for k, v in vals.items()}
    return capacity_figures(doc)


def round_se_rels(texts) -> np.ndarray:
    """:func:`round_se_rel` of many ``round_p50_s`` values at once (NaN where it has
    none): one JSON parse for the whole column."""
    import json

    texts = list(texts)
    out = np.full(len(texts), np.nan)
    good = [i for i, t in enumerate(texts) if isinstance(t, str) and t.startswith("[") and t.endswith("]")]
    try:
        lists = json.loads("[" + ",".join(texts[i] for i in good) + "]")
    except ValueError:
        return np.array([round_se_rel({"round_p50_s": t}) for t in texts], dtype=float)
    by_len: dict[int, tuple[list[int], list]] = {}
    for i, values in zip(good, lists):
        values = [x for x in values if x is not None] if isinstance(values, list) else None
        if values is not None and len(values) >= 2:
            idx, rows = by_len.setdefault(len(values), ([], []))
            idx.append(i)
            rows.append(values)
    for k, (idx, rows) in by_len.items():
        try:
            v = np.array(rows, dtype=float)  # one (cases, k) block per round count
        except (TypeError, ValueError):
            out[idx] = [round_se_rel({"round_p50_s": texts[i]}) for i in idx]
            continue
        ok = np.all(np.isfinite(v) & (v > 0), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            se = np.std(np.log(np.where(ok[:, None], v, 1.0)), axis=1, ddof=1) / math.sqrt(k)
        out[idx] = np.where(ok, se, np.nan)
    return out


def node_paths(refs, root: Path | str) -> list[Path]:
    """The run folders named by ``refs`` (run ids under ``root``, run folders, or
    directories of run folders: :func:`harness.results.run_folders`), each once, in the
    order given. Raises UserError for a ref that names no run."""
    from harness.results import run_folders

    seen, out = set(), []
    for ref in refs:
        for path in run_folders(ref, root):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def _best_rates(cases: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each case's best-sample rate in the unit of its bound (module doc: busbw for
    collectives, FLOP/s compute-bound, B/s memory/link-bound), over a cases frame at
    once: (values, units); NaN / "" where the case has none."""
    n = len(cases)

    def col(name):
        if name not in cases.columns:
            return np.full(n, np.nan)
        v = pd.to_numeric(cases[name], errors="coerce").to_numpy(dtype=float)
        return np.where(np.isfinite(v), v, np.nan)

    bus, flops, byts = col("best_busbw_Bps"), col("best_flops_per_s"), col("best_bytes_per_s")
    bound = cases["bound"].astype("string").fillna("").to_numpy() if "bound" in cases.columns else np.full(n, "")
    value = np.full(n, np.nan)
    unit = np.full(n, "", dtype=object)
    for mask, v, u in ((np.isfinite(bus), bus, "B/s"),
                       ((bound == "compute") & np.isfinite(flops), flops, "FLOP/s"),
                       (np.isin(bound, ["memory", "link"]) & np.isfinite(byts), byts, "B/s")):
        take = mask & np.isnan(value)
        value[take], unit[take] = v[take], u
    return value, unit


def _cat(values) -> pd.Categorical:
    """``values`` as a pandas Categorical of strings (kept when it already is one)."""
    if isinstance(values, pd.Series):
        values = values.array
    if isinstance(values, pd.Categorical):
        return values.rename_categories([str(c) for c in values.categories]) \
            if len(values.categories) and not all(isinstance(c, str) for c in values.categories) else values
    arr = np.asarray(values, dtype=object)
    return pd.Categorical(np.where(pd.isna(arr), None, arr).astype(object))


def _long_table(infos: list[dict], cases: pd.DataFrame, f: dict) -> pd.DataFrame:
    """The metric rows of every node (columns of LONG_COLUMNS before the statistics),
    vectorized over the whole fleet: ``cases`` holds every node's rows with ``_node``
    (index into ``infos``), text columns preferably as categories, and the per-round se
    either as ``round_se_rel`` or as the ``round_p50_s`` texts. Strings are handled per
    distinct value (case ids, families, devices), never per row."""
    from pandas.api.types import union_categoricals

    for c in CASE_COLUMNS:
        if c not in cases.columns and c != "round_p50_s":
            cases[c] = None
    status = _cat(cases["status"])
    cases = cases[np.asarray(status == "ok", dtype=bool)]
    ids = _cat(cases["case_id"])
    if f["cases"] != ["*"] and len(cases):
        keep = np.array([any(fnmatch.fnmatchcase(str(c), g) for g in f["cases"]) for c in ids.categories], dtype=bool)
        rows = (ids.codes >= 0) & keep[np.maximum(ids.codes, 0)]
        cases, ids = cases[rows], ids[rows]
    node = cases["_node"].to_numpy(dtype=np.int64)
    # Family: the table's where it is a non-empty string, else the case id's head.
    fam = _cat(cases["family"])
    heads = np.array([str(c).split(".")[0] for c in ids.categories] + [""], dtype=object)
    head = heads[ids.codes]  # code -1 (no id) takes the trailing ""
    fam_ok = np.asarray(fam.isna() == False, dtype=bool) & np.asarray(fam != "", dtype=bool) if len(fam) else \
        np.array([], bool)  # noqa: E712
    family = np.where(fam_ok, np.asarray(fam, dtype=object), head) if len(fam) else \
        np.array([], dtype=object)
    family = pd.Categorical(family)
    # Device class per (node, device): once per distinct pair, not per row.
    dev = _cat(cases["device"])
    dev_codes = dev.codes.astype(np.int64)
    pair = node * (len(dev.categories) + 1) + (dev_codes + 1)
    uniq, inverse = np.unique(pair, return_inverse=True)
    names = [infos[int(u // (len(dev.categories) + 1))]["_run"].class_of(
        "" if u % (len(dev.categories) + 1) == 0 else str(dev.categories[int(u % (len(dev.categories) + 1)) - 1]))
        for u in uniq]
    dev_class = pd.Categorical(np.asarray(names, dtype=object)[inverse.reshape(-1)]) if len(uniq) else \
        pd.Categorical([])
    if "round_se_rel" in cases.columns:
        se_all = cases["round_se_rel"].to_numpy(dtype=float)
    elif "round_p50_s" in cases.columns:
        texts = cases["round_p50_s"].to_numpy(dtype=object)
        se_all = np.concatenate([round_se_rels(texts[i:i + SE_CHUNK]) for i in range(0, len(texts), SE_CHUNK)]) \
            if len(texts) else np.array([])
    else:
        se_all = np.full(len(cases), np.nan)
    parts: dict[str, list] = {k: [] for k in ("_node", "device_class", "family", "case_id", "metric", "unit",
                                             "value", "round_se_rel")}
    for metric in f["metrics"]:
        if metric == "p50_s":
            value = pd.to_numeric(cases["p50_s"], errors="coerce").to_numpy(dtype=float)
            unit = pd.Categorical(np.full(len(cases), "s", dtype=object))
            se = se_all
        else:
            value, unit_arr = _best_rates(cases)
            unit = pd.Categorical(unit_arr)
            se = np.full(len(cases), np.nan)
        keep = np.isfinite(value)
        parts["_node"].append(node[keep])
        parts["device_class"].append(dev_class[keep])
        parts["family"].append(family[keep])
        parts["case_id"].append(ids[keep])
        parts["metric"].append(pd.Categorical(np.full(int(keep.sum()), metric, dtype=object)))
        parts["unit"].append(unit[keep])
        parts["value"].append(value[keep])
        parts["round_se_rel"].append(se[keep])
    run_rows = [(k, info, name) for k, info in enumerate(infos) for name in f["indicators"] if info.get(name) is not None]
    if run_rows:
        parts["_node"].append(np.array([k for k, _, _ in run_rows], dtype=np.int64))
        parts["device_class"].append(pd.Categorical([i["device_classes"] for _, i, _ in run_rows]))
        parts["family"].append(pd.Categorical([RUN_FAMILY] * len(run_rows)))
        parts["case_id"].append(pd.Categorical([""] * len(run_rows)))
        parts["metric"].append(pd.Categorical([n for _, _, n in run_rows]))
        parts["unit"].append(pd.Categorical([{"epsilon": "", "C_eff": "tokens/s", "C_nom": "tokens/s"}[n]
                                             for _, _, n in run_rows]))
        parts["value"].append(np.array([float(i[n]) for _, i, n in run_rows]))
        parts["round_se_rel"].append(np.full(len(run_rows), np.nan))
    out: dict = {}
    node_idx = np.concatenate(parts["_node"]) if parts["_node"] else np.array([], dtype=np.int64)
    # Categories: a 10,000-node fleet repeats each id, host and case name a million times.
    for key in ("run_id", "host", "label", "path"):
        per_node = pd.Categorical([str(i[key]) for i in infos])
        out[key] = pd.Categorical.from_codes(per_node.codes[node_idx] if len(node_idx) else np.array([], np.int8),
                                             categories=per_node.categories)
    for key in ("device_class", "family", "case_id", "metric", "unit"):
        pieces = [c if isinstance(c, pd.Categorical) else pd.Categorical(c) for c in parts[key]]
        cat = union_categoricals(pieces) if pieces else pd.Categorical([])
        out[key] = cat.rename_categories([str(c) for c in cat.categories]) if len(cat.categories) else cat
    out["value"] = np.concatenate(parts["value"]) if parts["value"] else np.array([])
    out["round_se_rel"] = np.concatenate(parts["round_se_rel"]) if parts["round_se_rel"] else np.array([])
    return pd.DataFrame(out)[[c for c in LONG_COLUMNS if c not in STAT_COLUMNS]]


def _group_stats(long: pd.DataFrame, f: dict) -> pd.DataFrame:
    """The robust z of every row within its (class, family, case, metric) group (module
    doc), vectorized: median, MAD, the scale with its floor and source, z with the node's
    round se."""
    keys = ["device_class", "family", "case_id", "metric"]
    g = long.groupby(keys, sort=False, observed=True)["value"]
    med = g.transform("median").to_numpy(dtype=float)
    dev = np.abs(long["value"].to_numpy(dtype=float) - med)
    mad = pd.Series(dev, index=long.index).groupby([long[k] for k in keys], sort=False, observed=True) \
        .transform("median").to_numpy(dtype=float)
    n = g.transform("size").to_numpy()
    rel = np.full(len(long), float(f["min_scale_rel"]))
    # Where each row's scale came from, as a small code (0 config, 1 family median, 2
    # class median, 3 own MAD) turned into text once per distinct (family, code, se):
    # per-row strings would cost a 10,000-node fleet gigabytes.
    src = np.zeros(len(long), dtype=np.int8)
    if f["pool_scale"] == "family" and len(long):
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = MAD_SCALE * mad / np.abs(med)
        per_case = pd.DataFrame({"device_class": long["device_class"], "family": long["family"],
                                 "case_id": long["case_id"], "metric": long["metric"], "spread": spread, "n": n})
        per_case = per_case[(per_case["n"] >= 3) & (per_case["family"] != RUN_FAMILY) & np.isfinite(spread)
                            & (np.abs(med) > 0)]
        per_case = per_case.drop_duplicates(keys)
        fam = per_case.groupby(["device_class", "family", "metric"], observed=True)["spread"].median()
        cls = per_case.groupby(["device_class", "metric"], observed=True)["spread"].median()
        idx_f = pd.MultiIndex.from_arrays([long["device_class"], long["family"], long["metric"]])
        idx_c = pd.MultiIndex.from_arrays([long["device_class"], long["metric"]])
        f_rel = fam.reindex(idx_f).to_numpy(dtype=float)
        c_rel = cls.reindex(idx_c).to_numpy(dtype=float)
        has = np.isfinite(f_rel)  # the family is pooled only where it has cases of its own
        fam_wins = f_rel >= np.nan_to_num(c_rel, nan=-1)
        pool = np.where(has, np.where(fam_wins, f_rel, c_rel), np.nan)
        take = has & (pool > rel)
        rel = np.where(take, pool, rel)
        src = np.where(take, np.where(fam_wins, 1, 2), src).astype(np.int8)
    scale = np.maximum(MAD_SCALE * mad, rel * np.abs(med))
    src = np.where((scale > 0) & (scale == MAD_SCALE * mad), 3, src).astype(np.int8)
    x = long["value"].to_numpy(dtype=float)
    se = long["round_se_rel"].to_numpy(dtype=float)
    group_has_se = pd.Series(np.isfinite(se) & (se > 0), index=long.index).groupby(
        [long[k] for k in keys], sort=False, observed=True).transform("any").to_numpy(dtype=bool)
    own = np.where(group_has_se, np.nan_to_num(se, nan=0.0) * np.abs(med), 0.0)
    denom = np.sqrt(scale * scale + own * own)
    flat = np.where(x == med, 0.0, np.where(x > med, np.inf, -np.inf))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(denom > 0, (x - med) / np.where(denom > 0, denom, 1.0), flat)
    fam_codes = long["family"].cat.codes.to_numpy() if hasattr(long["family"], "cat") else \
        pd.Categorical(long["family"]).codes
    fam_names = list(long["family"].cat.categories) if hasattr(long["family"], "cat") else \
        list(pd.Categorical(long["family"]).categories)
    combo = (fam_codes.astype(np.int64) * 8 + src.astype(np.int64) * 2 + group_has_se.astype(np.int64))
    uniq, inverse = np.unique(combo, return_inverse=True)
    texts = []
    for c in uniq:
        fam_name, code, with_se = fam_names[int(c // 8)], int(c % 8) // 2, bool(c % 2)
        text = ("config min_scale_rel", f"{fam_name} family median of 1.4826·MAD/median",
                "class median of 1.4826·MAD/median", "own MAD")[code]
        texts.append(text + (" + node round se" if with_se else ""))
    source = pd.Categorical.from_codes(inverse.reshape(-1).astype(np.int32),
                                       categories=pd.Index(list(dict.fromkeys(texts)), dtype=object)) \
        if len(set(texts)) == len(texts) else pd.Categorical(np.asarray(texts, dtype=object)[inverse.reshape(-1)])
    out = long.copy()
    out["n_nodes"], out["median"], out["mad"], out["scale"] = n, med, mad, scale
    out["scale_floor_rel"], out["scale_source"], out["z"] = rel, source, z
    return out


def _view(infos: list[dict], cases: pd.DataFrame, cfg: dict, skipped: list[dict] | None) -> dict:
    """The statistics and node flags of :func:`fleet_view` / :func:`fleet_view_paths`."""
    f = cfg["fleet"]
    threshold = float(f["z_threshold"])
    long = _long_table(infos, cases, f)
    nodes = [{k: v for k, v in i.items() if not k.startswith("_")} for i in infos]
    long = _group_stats(long, f) if len(long) else long.assign(
        **{c: pd.Series(dtype=float) for c in STAT_COLUMNS})
    long["flagged"] = np.abs(long["z"].to_numpy(dtype=float)) > threshold
    long = long[LONG_COLUMNS]

    rule = f["node_rule"]
    absz = np.abs(long["z"].to_numpy(dtype=float))
    by_path = long.assign(absz=absz).groupby("path", observed=True, sort=False)
    counts = by_path.size()
    flagged_counts = by_path["flagged"].sum()
    cases_only = long.assign(absz=absz)
    cases_only = cases_only[cases_only["family"] != RUN_FAMILY]
    fam_med = cases_only.groupby(["path", "family"], observed=True, sort=True)["absz"].median()
    worst_idx = long.assign(absz=np.where(np.isnan(absz), -1.0, absz)).groupby(
        "path", observed=True, sort=False)["absz"].idxmax() if len(long) else pd.Series(dtype=int)
    flagged_rows = long[long["flagged"]]
    flagged_by_path = {p: grp.to_dict(orient="records")
                       for p, grp in flagged_rows.groupby("path", observed=True, sort=False)}
    for node in nodes:
        path = node["path"]
        node["metrics"] = int(counts.get(path, 0))
        node["flagged_metrics"] = int(flagged_counts.get(path, 0))
        fams = fam_med.xs(path, level="path") if path in fam_med.index.get_level_values("path") else pd.Series(dtype=float)
        node["family_median_abs_z"] = {str(fam): float(v) for fam, v in fams.items()}
        records = flagged_by_path.get(path, [])
        reasons = [f"{r['metric']} |z| {abs(r['z']):.3g}" for r in records if r["family"] == RUN_FAMILY]
        if rule == "any":
            reasons += [f"{r['metric']} {r['case_id']} |z| {abs(r['z']):.3g}" for r in records if r["family"] != RUN_FAMILY]
        else:
            reasons += [f"{fam}: median |z| {mz:.3g}" for fam, mz in node["family_median_abs_z"].items() if mz > threshold]
        node["flag_reasons"] = reasons
        node["flagged"] = bool(reasons)
        if node["metrics"]:
            worst = long.loc[worst_idx[path]]
            node["max_abs_z"] = float(abs(worst["z"]))
            node["worst"] = f"{worst['metric']} {worst['case_id']}".strip()
        else:
            node["max_abs_z"], node["worst"] = None, ""

    capacity = fleet_capacity(nodes)
    class_sizes = {}
    for node in nodes:
        for cls in node["device_classes"].split(" + "):
            class_sizes[cls] = class_sizes.get(cls, 0) + 1
    return {
        "z_threshold": threshold,
        "min_scale_rel": float(f["min_scale_rel"]),
        "pool_scale": f["pool_scale"],
        "node_rule": rule,
        "metrics": list(f["metrics"]),
        "indicators": list(f["indicators"]),
        "classes": class_sizes,
        "nodes": nodes,
        "skipped": list(skipped or []),
        "flagged_nodes": [n["run_id"] for n in nodes if n["flagged"]],
        "flags": flagged_rows.to_dict(orient="records"),
        "capacity": capacity,
        "long": long,
    }


def fleet_capacity(nodes: list[dict]) -> dict:
    both = [n for n in nodes if n["C_eff"] is not None and n["C_nom"] is not None]
    if not both:
        missing = sum(1 for n in nodes if not n["indicators"])
        reason = (f"not measurable: no indicators.json in {missing} of {len(nodes)} runs" if missing
                  else "not measurable: no run reports both C_eff and C_nom")
        return {"measurable": False, "reason": reason, "nodes": 0}
    c_eff = sum(n["C_eff"] for n in both)
    c_nom = sum(n["C_nom"] for n in both)
    out = {"measurable": True, "nodes": len(both), "of_nodes": len(nodes), "sum_C_eff": c_eff, "sum_C_nom": c_nom,
           "epsilon": c_eff / c_nom if c_nom else None}
    priced = [n for n in both if n["price_per_hour"] is not None]
    if not priced or len(priced) < len(both):
        out["cost"] = {"measurable": False,
                       "reason": "no price_per_device_hour in config" if not priced
                       else "price_per_device_hour does not cover every device class"}
    elif c_eff <= 0:
        out["cost"] = {"measurable": False, "reason": "Σ C_eff is 0: no step met the SLO"}
    else:
        per_s = sum(n["price_per_hour"] for n in priced) / 3600.0
        out["cost"] = {"measurable": True, "price_per_hour": per_s * 3600.0,
                       "per_effective_token": per_s / c_eff,
                       "per_nominal_token": per_s / c_nom if c_nom else None,
                       "per_million_effective_tokens": per_s / c_eff * 1e6}
    return out


# -- rendering -------------------------------------------------------------------------
def _num(v, unit: str = "") -> str:
    from harness.show import seconds, si

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if unit == "s":
        return seconds(v)
    if unit in ("B/s", "FLOP/s", "tokens/s"):
        return si(v, unit)
    return f"{v:.4g}"


def print_fleet(doc: dict, console=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from harness.compare import fitted_console

    console = console or fitted_console()
    console.print(f"{len(doc['nodes'])} runs; classes: "
                  + ", ".join(f"{escape(c)} ({k} nodes)" for c, k in doc["classes"].items())
                  + f"; metrics per case: {', '.join(doc['metrics'])}; robust z = (x − median)/max(1.4826·MAD, "
                  f"r·median), r = max({doc['min_scale_rel']:g}"
                  + (", the family's or class's median 1.4826·MAD/median" if doc["pool_scale"] == "family" else "")
                  + f"), flag |z| > {doc['z_threshold']:g}; node rule: "
                  + ("any flagged metric" if doc["node_rule"] == "any"
                     else "median |z| of a probe family, or a run indicator (ε, C_eff, C_nom), beyond the threshold"))
    small = [c for c, k in doc["classes"].items() if k < 3]
    if small:
        console.print(f"[yellow]fewer than 3 nodes in {escape(', '.join(small))}: their z-scores carry little meaning[/]")
    for sk in doc.get("skipped") or []:
        # soft_wrap: the reason names a file; a path broken across lines cannot be copied.
        console.print(f"[yellow]node {escape(sk['run_id'])} left out: {escape(sk['reason'])}[/]", soft_wrap=True)
    # A fleet of thousands: the table lists the flagged nodes only (every node is in
    # --json, --csv and --parquet).
    shown = doc["nodes"] if len(doc["nodes"]) <= NODE_TABLE_MAX else [n for n in doc["nodes"] if n["flagged"]]
    title = "nodes" if shown is doc["nodes"] else f"flagged nodes ({len(shown)} of {len(doc['nodes'])}; all in --json/--csv)"
    t = Table(title=title)
    for h in ("run", "host", "label", "device class", "metrics |z|>thr", "median |z| per family", "max |z| (metric)",
              "ε", "C_eff", "C_nom", "node"):
        t.add_column(h, overflow="fold")
    for n in shown:
        flag = f"[bold red]FLAGGED: {escape('; '.join(n['flag_reasons']))}[/]" if n["flagged"] else "ok"
        fams = ", ".join(f"{fam} {_num(mz)}" for fam, mz in n["family_median_abs_z"].items()) or "—"
        label = (n["label"] or "—") + ("" if n["status"] == "complete" else f" ({n['status']})")
        t.add_row(n["run_id"], escape(n["host"]), escape(label), escape(n["device_classes"]),
                  f"{n['flagged_metrics']}/{n['metrics']}", escape(fams),
                  f"{_num(n['max_abs_z'])} ({escape(n['worst'])})" if n["worst"] else "—",
                  _num(n["epsilon"]), _num(n["C_eff"], "tokens/s"), _num(n["C_nom"], "tokens/s"), flag)
    console.print(t)
    if doc["flags"]:
        flags = sorted(doc["flags"], key=lambda r: -abs(r["z"]))
        ft = Table(title=f"flagged metrics (|z| > {doc['z_threshold']:g})"
                   + (f", the {FLAG_TABLE_MAX} largest of {len(flags)}" if len(flags) > FLAG_TABLE_MAX else ""))
        for h in ("run", "device class", "case", "metric", "value", "class median", "z", "nodes"):
            ft.add_column(h, overflow="fold")
        for r in flags[:FLAG_TABLE_MAX]:
            ft.add_row(r["run_id"], escape(r["device_class"]), escape(r["case_id"] or "(run)"), r["metric"],
                       _num(r["value"], r["unit"]), _num(r["median"], r["unit"]), _num(r["z"]), str(r["n_nodes"]))
        console.print(ft)
    cap = doc["capacity"]
    if cap["measurable"]:
        line = (f"fleet effective capacity: Σ C_eff {_num(cap['sum_C_eff'], 'tokens/s')} of Σ C_nom "
                f"{_num(cap['sum_C_nom'], 'tokens/s')} (ε {_num(cap['epsilon'])}, {cap['nodes']} of {cap['of_nodes']} nodes)")
        console.print(line)
        cost = cap["cost"]
        if cost["measurable"]:
            console.print(f"cost: {cost['per_million_effective_tokens']:.4g} per million effective tokens "
                          f"(at nominal: {cost['per_nominal_token'] * 1e6:.4g}); fleet price {cost['price_per_hour']:.4g}/h")
        else:
            console.print(f"cost per effective token: not measurable: {cost['reason']}")
    else:
        console.print(f"fleet effective capacity (Σ C_eff vs Σ C_nom): {cap['reason']}; "
                      "cost per effective token: not measurable without C_eff")
    flagged = doc["flagged_nodes"]
    console.print(f"[{'bold red' if flagged else 'bold green'}]{len(flagged)} of {len(doc['nodes'])} nodes flagged"
                  + (f": {', '.join(flagged)}" if flagged else "") + "[/]")


def write_table(long: pd.DataFrame, csv: Path | None, parquet: Path | None) -> None:
    for path, kind in ((csv, "csv"), (parquet, "parquet")):
        if path is None:
            continue
        from harness import atomic

        # harness.atomic: refuses non-regular targets, one line on a read-only or full disk.
        if kind == "csv":
            atomic.write_text(Path(path), long.to_csv(index=False), what=f"--{kind}")
        else:
            atomic.write_parquet(long, Path(path), what=f"--{kind}")


def jsonable(doc: dict) -> dict:
    from harness.compare import to_jsonable

    out = {k: v for k, v in doc.items() if k != "long"}
    out["table"] = doc["long"].to_dict(orient="records")
    return to_jsonable(out)
