"""Export a loaded run as metric records: JSON lines, CSV, Parquet, or a Prometheus
textfile (``coherence export``).

One job: :func:`records` turns a :class:`harness.results.Run` into a list of
:class:`Record` (metric, value, unit, labels); the writers only serialize that list, so
every format carries the same numbers under the same names.

Records (every one labelled ``run_id`` and ``host``; the host is the pseudonym where
the run was made with ``--anonymize``):

- the run: ``coherence_run_info`` (1, labels ``run_label``, ``run_status``, ``schema_version``,
  ``coherence_version``, ``virtualization``), its start and end as Unix seconds, and
  ``coherence_run_cases`` per status;
- per case, whatever its status: ``coherence_case_status`` as a state set, one record per
  status ``ok|failed|timeout|skipped`` with value 1 for the case's status and 0 for the
  others, the reason (one line, at most 200 characters) as a label, so failed and
  skipped cases never vanish from a dashboard;
- per ``ok`` case, where the value exists: latency p50/p90/p99/mean/min/max in seconds,
  the timed repetitions, FLOP/s and B/s at the median, ``algbw``/``busbw`` for
  collectives, the roofline fraction; energy per repetition (joules), mean power
  (watts), FLOP/J and B/J labelled ``energy_method`` and ``energy_scope``, and
  ``coherence_case_energy_info`` saying whether energy was measured and, if not, why
  (runs made before energy accounting have none of these);
- from ``indicators.json`` (absent before ``coherence collect``): the capacity
  headline (C_eff, C_nom, ε), the capacity ladder per device and resource
  (nominal/isolated/coordinated rates and the efficiency I/N), per composite case
  κ (labelled ``graph_applied`` true/false where the composite records ``extra.graph``),
  C_eff, C_nom, ε, T_pred, T_meas and the SLO-met fraction, the full-model serving
  metrics (TTFT/TPOT/ITL/E2E quantiles, request and output-token throughput, goodput,
  the layer scale of a truncated composite), J/token and tokens/J per composite and of
  the headline, FLOP/J and B/J per device, every mode 1–4
  indicator with a numeric value, and the count of indicators per verdict.

Case records carry ``device``, ``device_class``, ``case_id``, ``probe``, ``family`` and
``backend``; indicator records ``mode``, ``indicator``, ``unit`` and ``verdict``. A value
that is missing or not finite is left out (no NaN), and an indicator that is not
measurable has no record (its count is in ``coherence_indicator_verdicts``).

Names follow Prometheus conventions: ``coherence_<what>_<unit>`` with base units
(``seconds``, ``bytes``, ``ratio``; rates ``bytes_per_second``, ``flops_per_second``,
``tokens_per_second``; energy ``joules``, ``watts``, ``flops_per_joule``,
``bytes_per_joule``, ``tokens_per_joule``, ``joules_per_token``); values without such a unit go to a name ending in ``_value``
(``coherence_indicator_value``) and keep their unit in the ``unit`` label.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from harness.errors import UserError

FORMATS = ("csv", "parquet", "jsonl", "prometheus")
CASE_STATES = ("ok", "failed", "timeout", "skipped")
REASON_MAX = 200

# Label columns in the order tables show them; a record uses the ones that apply.
LABEL_ORDER = (
    "run_id", "host", "device", "device_class", "case_id", "probe", "family", "backend",
    "status", "reason", "mode", "indicator", "unit", "verdict", "resource", "dtype", "rung",
    "run_label", "run_status", "schema_version", "coherence_version", "virtualization",
    "energy_method", "energy_scope", "energy_measured", "energy_reason", "graph_applied",
)

# Human unit (as indicators.json and the cases table use them) -> Prometheus suffix.
UNIT_SUFFIX = {
    "s": "seconds",
    "B": "bytes",
    "B/s": "bytes_per_second",
    "FLOP/s": "flops_per_second",
    "tokens/s": "tokens_per_second",
    "ratio": "ratio",
    "J": "joules",
    "W": "watts",
    "FLOP/J": "flops_per_joule",
    "B/J": "bytes_per_joule",
    "tokens/J": "tokens_per_joule",
    "J/token": "joules_per_token",
}

# (cases column, metric name, unit, help)
CASE_METRICS = (
    ("p50_s", "coherence_case_latency_p50_seconds", "s", "Median duration of one timed repetition of the case."),
    ("p90_s", "coherence_case_latency_p90_seconds", "s", "90th percentile duration of one timed repetition."),
    ("p99_s", "coherence_case_latency_p99_seconds", "s", "99th percentile duration of one timed repetition."),
    ("mean_s", "coherence_case_latency_mean_seconds", "s", "Mean duration of one timed repetition."),
    ("min_s", "coherence_case_latency_min_seconds", "s", "Shortest timed repetition."),
    ("max_s", "coherence_case_latency_max_seconds", "s", "Longest timed repetition."),
    ("n", "coherence_case_repetitions", "count", "Timed repetitions of the case (n)."),
    ("flops_per_s", "coherence_case_flops_per_second", "FLOP/s",
     "Achieved FLOP/s at the median: work-model FLOPs per repetition / p50."),
    ("bytes_per_s", "coherence_case_bandwidth_bytes_per_second", "B/s",
     "Achieved bandwidth at the median: work-model minimum bytes per repetition / p50."),
    ("algbw_Bps", "coherence_case_algbw_bytes_per_second", "B/s", "Collective algorithm bandwidth: size / p50."),
    ("busbw_Bps", "coherence_case_busbw_bytes_per_second", "B/s",
     "Collective bus bandwidth: algbw x the nccl-tests factor of the operation."),
    ("roofline_fraction", "coherence_case_roofline_ratio", "ratio",
     "Achieved rate at the median / nominal peak of the bounding resource."),
)

# Energy of an ok case (cases.parquet columns, issue 16; runs made before them have none):
# (column, metric name, unit, help). Each record is labelled with energy_method and
# energy_scope; a case whose energy was not measured has coherence_case_energy_info with
# energy_measured="false" and the reason instead.
ENERGY_METRICS = (
    ("energy_j", "coherence_case_energy_joules", "J",
     "Energy of one timed repetition, summed over the case's devices (NVML total-energy counter, an integral of "
     "NVML power samples, or RAPL; energy_method says which)."),
    ("avg_power_w", "coherence_case_power_watts", "W", "Mean power while the case's repetitions ran: energy / time."),
    ("flops_per_j", "coherence_case_flops_per_joule", "FLOP/J", "Work-model FLOPs per repetition / energy_j."),
    ("bytes_per_j", "coherence_case_bytes_per_joule", "B/J", "Work-model minimum bytes per repetition / energy_j."),
)

LADDER_RUNGS = (("N", "nominal"), ("I", "isolated"), ("C", "coordinated"))


@dataclass(frozen=True)
class Record:
    """One exported value. ``metric`` is the Prometheus metric name (the same name in
    every format); ``unit`` the human unit (``s``, ``B/s``, ``ratio``, ...)."""

    metric: str
    value: float
    unit: str
    labels: dict
    help: str


# -- building records ------------------------------------------------------------------
def _finite(value) -> float | None:
    if value is None or isinstance(value, (bool, str, dict, list)):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _missing(value) -> bool:
    """None, NaN or pandas' NA (a missing cell of a string column)."""
    if value is None:
        return True
    try:
        return bool(value != value) or type(value).__name__ == "NAType"
    except (TypeError, ValueError):  # NA compared raises in some pandas versions
        return True


def _one_line(text, limit: int | None = None) -> str:
    s = re.sub(r"\s+", " ", str(text or "")).strip()
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


def _labels(**labels) -> dict:
    """Labels without empty values, as strings (an empty label is no label in Prometheus)."""
    return {k: str(v) for k, v in labels.items() if v is not None and str(v) != ""}


def named(stem: str, unit: str | None) -> str:
    """``coherence_<stem>_<unit suffix>``; ``..._value`` where no base unit fits. Units
    that name a fraction (``fraction of step``) are ratios."""
    unit = (unit or "").strip()
    suffix = UNIT_SUFFIX.get(unit)
    if suffix is None and unit.lower().startswith("fraction"):
        suffix = "ratio"
    return f"coherence_{stem}_{suffix or 'value'}"


def _unix(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def run_timestamp(run) -> float | None:
    """When the measurement ended (manifest ``finished_at``; ``started_at`` for a run
    that never finished), as Unix seconds: an export of the same run is the same."""
    return _unix(run.manifest.get("finished_at")) or _unix(run.manifest.get("started_at"))


class _CaseLabels:
    """Labels of a case id: from the cases table, else parsed from the id itself
    (``probe[params]@device``)."""

    def __init__(self, run, base: dict):
        self.run = run
        self.base = base
        self.rows = {}
        for row in run.cases.to_dict(orient="records"):
            self.rows[str(row["case_id"])] = row

    def __call__(self, case_id: str | None) -> dict:
        if not case_id:
            return dict(self.base)
        row = self.rows.get(str(case_id))
        if row is None:
            probe = str(case_id).split("[", 1)[0]
            device = str(case_id).rsplit("@", 1)[1] if "@" in str(case_id) else ""
            row = {"probe": probe, "device": device, "family": probe.split(".", 1)[0]}

        def text(key):
            v = row.get(key)
            return None if _missing(v) else v

        device = text("device")
        return {**self.base, **_labels(device=device, device_class=self.run.class_of(str(device)) if device else None,
                                       case_id=case_id, probe=text("probe"), family=text("family"),
                                       backend=text("backend"))}


def records(run) -> list[Record]:
    """Every export record of a loaded run (see the module docstring)."""
    base = _labels(run_id=run.run_id, host=run.host)
    case_labels = _CaseLabels(run, base)
    out: list[Record] = []
    out += _run_records(run, base)
    out += _case_records(run, case_labels)
    if run.indicators:
        out += _indicator_records(run.indicators, base, case_labels)
    check_unique(out)
    return out


def _run_records(run, base: dict) -> list[Record]:
    m = run.manifest
    virt = ((m.get("environment") or {}).get("virtualization") or {}).get("summary")
    info = _labels(**base, run_label=run.label, run_status=m.get("status"), schema_version=m.get("schema_version"),
                   coherence_version=(m.get("versions") or {}).get("coherence"), virtualization=virt)
    out = [Record("coherence_run_info", 1.0, "info", info,
                  "A coherence run; the labels describe it (value always 1).")]
    for key, metric, text in (("started_at", "coherence_run_start_timestamp_seconds", "Start of the run, Unix time."),
                              ("finished_at", "coherence_run_end_timestamp_seconds", "End of the run, Unix time.")):
        t = _unix(m.get(key))
        if t is not None:
            out.append(Record(metric, t, "s", dict(base), text))
    statuses = [str(s) for s in run.cases["status"] if not _missing(s)] if len(run.cases) else []
    for state in list(CASE_STATES) + sorted(set(statuses) - set(CASE_STATES)):
        out.append(Record("coherence_run_cases", float(statuses.count(state)), "count", {**base, "status": state},
                          "Cases of the run per status."))
    return out


def _case_records(run, case_labels: _CaseLabels) -> list[Record]:
    out = []
    for row in run.cases.to_dict(orient="records"):
        labels = case_labels(str(row["case_id"]))
        status = "" if _missing(row.get("status")) else str(row["status"])
        reason = _one_line(row.get("reason") if isinstance(row.get("reason"), str) else "", REASON_MAX)
        states = list(CASE_STATES) + ([status] if status and status not in CASE_STATES else [])
        for state in states:
            out.append(Record("coherence_case_status", 1.0 if state == status else 0.0, "bool",
                              {**labels, **_labels(status=state, reason=reason)},
                              "Status of the case as a state set: 1 for its status (ok, failed, timeout, "
                              "skipped), 0 for the others; reason says why it was not ok."))
        if status != "ok":
            continue
        for column, metric, unit, text in CASE_METRICS:
            value = _finite(row.get(column))
            if value is not None:
                out.append(Record(metric, value, unit, dict(labels), text))
        out += _energy_records(row, labels)
    return out


def _energy_records(row: dict, labels: dict) -> list[Record]:
    """An ok case's energy records (:data:`ENERGY_METRICS`) labelled with its
    ``energy_method`` and ``energy_scope``, and ``coherence_case_energy_info`` (value 1,
    Prometheus' info convention) saying whether energy was measured and, where not, the
    recorded ``energy_reason`` (one line, at most 200 characters), so a case without an
    energy figure says why instead of vanishing. Nothing for runs made before the
    energy columns (no ``energy_j`` in cases.parquet)."""
    if "energy_j" not in row:
        return []

    def text(key):
        v = row.get(key)
        return None if _missing(v) else _one_line(v, REASON_MAX)

    how = _labels(energy_method=text("energy_method"), energy_scope=text("energy_scope"))
    measured = _finite(row.get("energy_j")) is not None
    out = [Record("coherence_case_energy_info", 1.0, "info",
                  {**labels, **how, "energy_measured": "true" if measured else "false",
                   **_labels(energy_reason=None if measured else (text("energy_reason") or "not recorded"))},
                  "Energy accounting of the case (value always 1): energy_measured, the method and scope, or why "
                  "it was not measured (energy_reason).")]
    for column, metric, unit, help_text in ENERGY_METRICS:
        value = _finite(row.get(column))
        if value is not None:
            out.append(Record(metric, value, unit, {**labels, **how}, help_text))
    return out


def _graph_applied(row: dict | None) -> str | None:
    """"true"/"false" from a composite case's ``extra.graph.applied`` (whether its steps
    replayed CUDA graphs; probes/composite.py), None where the case has no
    ``extra.graph`` (runs made before the graph parameter, or no case row)."""
    from harness.results import json_object

    graph = json_object((row or {}).get("extra")).get("graph")
    if not isinstance(graph, dict) or "applied" not in graph:
        return None
    return "true" if graph.get("applied") else "false"


def _indicator_records(doc: dict, base: dict, case_labels: _CaseLabels) -> list[Record]:
    out = []
    cap = doc.get("capacity") or {}
    cap_unit = cap.get("unit") or "tokens/s"
    for key, stem, unit, text in (
        ("C_eff", "capacity_effective", cap_unit, "Effective serving capacity of the node (C_eff of its headline composite)."),
        ("C_nom", "capacity_nominal", cap_unit, "Nominal serving capacity from the datasheet peaks (C_nom)."),
        ("epsilon", "capacity_epsilon", "ratio", "Capacity efficiency epsilon = C_eff / C_nom."),
        ("tokens_per_j", "capacity", "tokens/J", "Output tokens per joule of the node's headline composite."),
    ):
        value = _finite(cap.get(key))
        if value is not None:
            out.append(Record(named(stem, unit), value, unit, case_labels(cap.get("from_case")), text))

    for dev in doc.get("ladder") or []:
        dev_labels = {**base, **_labels(device=dev.get("device"), device_class=dev.get("device_class"))}
        rungs = [("compute", dtype, rung) for dtype, rung in (dev.get("compute") or {}).items()]
        rungs += [(res, None, dev.get(res)) for res in ("memory", "link", "host_link")]
        for resource, dtype, rung in rungs:
            if not isinstance(rung, dict):
                continue
            where = {**dev_labels, **_labels(resource=resource, dtype=dtype)}
            for key, name in LADDER_RUNGS:
                value = _finite(rung.get(key))
                if value is not None:
                    out.append(Record(named("ladder", rung.get("unit")), value, str(rung.get("unit") or ""),
                                      {**where, **_labels(rung=name, case_id=rung.get(f"{key}_case"))},
                                      "Capacity ladder: nominal peak, best isolated rate, rate inside composite "
                                      "cases, per device and resource."))
            eff = _finite(rung.get("efficiency"))
            if eff is not None:
                out.append(Record("coherence_ladder_efficiency_ratio", eff, "ratio", where,
                                  "Isolated over nominal rate (I/N) per device and resource."))
        for key, ind in (dev.get("energy") or {}).items():
            value = _finite(ind.get("value")) if isinstance(ind, dict) else None
            if value is None:
                continue  # not measurable: the reason is in indicators.json and each case's energy_info
            unit = str(ind.get("unit") or "")
            out.append(Record(named("ladder_energy", unit), value, unit,
                              {**dev_labels, **_labels(dtype=ind.get("dtype"), case_id=(ind.get("cases") or [None])[0],
                                                       energy_method=ind.get("energy_method"))},
                              "Best work per joule of the device's isolated cases: FLOP/J of compute-bound (gemm), "
                              "B/J of memory-probe cases."))

    for entry in doc.get("serving") or []:
        labels = case_labels(entry.get("case_id"))
        for key, stem, text in (
            ("kappa", "serving_kappa", "Coherence kappa = T_pred / T_meas of the composite."),
            ("C_eff", "serving_effective", "Effective capacity of the composite: tokens/s x SLO-met fraction."),
            ("C_nom", "serving_nominal", "Nominal capacity of the composite from the datasheet peaks."),
            ("epsilon", "serving_epsilon", "epsilon = C_eff / C_nom of the composite."),
            ("j_per_token", "serving", "Energy per output token of the composite, full model (J/token)."),
            ("tokens_per_j", "serving", "Output tokens per joule of the composite, full model (1 / J per token)."),
        ):
            ind = entry.get(key)
            if not isinstance(ind, dict) or _finite(ind.get("value")) is None:
                continue
            unit = str(ind.get("unit") or "")
            # κ of a graphed and of an eager composite are different findings: the label
            # says which (absent where the case has no extra.graph, e.g. older runs).
            graph = _graph_applied(case_labels.rows.get(str(entry.get("case_id")))) if key == "kappa" else None
            out.append(Record(named(stem, unit), _finite(ind["value"]), unit,
                              {**labels, **_labels(verdict=ind.get("verdict"), graph_applied=graph)}, text))
        for key, metric, unit, text in (
            ("T_pred_s", "coherence_serving_predicted_seconds", "s",
             "T_pred: sum of count x p50 of the isolated component cases."),
            ("T_meas_p50_s", "coherence_serving_measured_p50_seconds", "s", "T_meas: p50 of the composite."),
            ("slo_fraction", "coherence_serving_slo_met_ratio", "ratio", "Fraction of steps (requests) meeting the SLO."),
        ):
            value = _finite(entry.get(key))
            if value is not None:
                out.append(Record(metric, value, unit, dict(labels), text))
        out.extend(_serving_metric_records(entry, labels))

    for mode in ("mode1", "mode2", "mode3", "mode4"):
        for name, ind in (doc.get(mode) or {}).items():
            if not isinstance(ind, dict):
                continue
            value = _finite(ind.get("value"))
            if value is None:
                continue  # not measurable, or a text value (the fingerprint: run_info's label)
            unit = str(ind.get("unit") or "")
            out.append(Record(named("indicator", unit), value, unit,
                              {**base, **_labels(mode=mode, indicator=name, unit=unit, verdict=ind.get("verdict"))},
                              "Coherence indicator of INDICATORS.md (mode 1-4); unit label as in indicators.json."))

    for verdict, count in sorted((doc.get("summary") or {}).items()):
        value = _finite(count)
        if value is not None:
            out.append(Record("coherence_indicator_verdicts", value, "count", {**base, "verdict": str(verdict)},
                              "Indicators of the run per verdict (ok, warn, fail, info, not measurable)."))
    return out


SERVING_LATENCIES = (
    ("ttft", "Time to first token of the full model (arrival to first output token, queueing included; vLLM "
             "benchmark_serving)."),
    ("tpot", "Time per output token of the full model: (E2E - TTFT) / (tokens - 1); a TP step's full-model step time."),
    ("itl", "Inter-token latency of the full model: gaps between consecutive output tokens, all requests pooled."),
    ("e2e", "End-to-end request latency of the full model (arrival to last token)."),
)


def _serving_metric_records(entry: dict, labels: dict) -> list[Record]:
    """A composite's serving metrics (full model, indicators.json): TTFT/TPOT/ITL/E2E
    quantiles (label ``quantile``), request and output-token throughput, goodput, and
    the truncation scale (layers of the model / layers run, labels ``layers_run`` and
    ``model_layers``). Absent figures (older runs, TP steps without TTFT) give no record."""
    out = []
    for name, text in SERVING_LATENCIES:
        for q, label in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):
            value = _finite(entry.get(f"{name}_{q}_s"))
            if value is not None:
                out.append(Record(f"coherence_serving_{name}_seconds", value, "s", {**labels, "quantile": label}, text))
    for key, metric, unit, text in (
        ("request_throughput", "coherence_serving_request_throughput_requests_per_second", "requests/s",
         "Completed requests per second of the benchmark (first arrival to last completion), full model."),
        ("output_throughput", "coherence_serving_output_throughput_tokens_per_second", "tokens/s",
         "Output tokens per second of the benchmark, full model."),
        ("goodput", "coherence_serving_goodput_requests_per_second", "requests/s",
         "Requests per second meeting both the TTFT and the TPOT SLO (vLLM --goodput, DistServe), full model."),
    ):
        ind = entry.get(key)
        value = _finite(ind.get("value")) if isinstance(ind, dict) else None
        if value is not None:
            out.append(Record(metric, value, unit, dict(labels), text))
    tr = entry.get("truncation") or {}
    scale = _finite(tr.get("scale"))
    if scale is not None:
        out.append(Record("coherence_serving_layer_scale_ratio", scale, "ratio",
                          {**labels, "layers_run": str(tr.get("layers_run")), "model_layers": str(tr.get("model_layers"))},
                          "Model layers / layers the truncated composite ran (1 for runs of older code)."))
    return out


def _identity(r: Record) -> tuple:
    return (r.metric, tuple(sorted((k, v) for k, v in r.labels.items() if v != "")))


def check_unique(recs: list[Record]) -> None:
    """One value per metric and label set: Prometheus (and node_exporter's textfile
    collector, which treats a missing label as empty) rejects duplicates. A duplicate is
    a bug here, never the user's input."""
    seen = set()
    for r in recs:
        key = _identity(r)
        if key in seen:
            raise RuntimeError(f"export: duplicate record {r.metric}{dict(key[1])}")
        seen.add(key)


# -- writers ---------------------------------------------------------------------------
_METRIC_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def escape_label_value(value: str) -> str:
    """A label value as the text format writes it (backslash, double quote and newline
    escaped); prometheus_client does this when it writes the file, this is for readers."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _RecordCollector:
    """A prometheus_client custom collector over built records: one gauge family per
    metric name, in the order the records were built, every sample with its own label
    set (labels that do not apply are absent, not empty)."""

    def __init__(self, recs: list[Record]):
        self.families: dict[str, list[Record]] = {}
        for r in recs:
            self.families.setdefault(r.metric, []).append(r)

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for name, members in self.families.items():
            family = Metric(name, members[0].help, "gauge")
            for r in members:
                family.add_sample(name, dict(r.labels), float(r.value))
            yield family


def to_prometheus(recs: list[Record]) -> str:
    """Text exposition format 0.0.4 as node_exporter's textfile collector reads it,
    written by prometheus_client (``exposition.generate_latest`` over a
    ``CollectorRegistry`` holding :class:`_RecordCollector`): each family once, HELP and
    TYPE (gauge) first, its samples together, label values escaped, no timestamps (the
    textfile collector refuses them). Names, label names and values are checked first:
    a bad one is a bug here (RuntimeError), never a file Prometheus would reject."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    for r in recs:
        if not _METRIC_RE.fullmatch(r.metric):
            raise RuntimeError(f"export: invalid metric name {r.metric!r}")
        if not math.isfinite(r.value):
            raise RuntimeError(f"export: non-finite value for {r.metric}")
        for key in r.labels:
            if not _LABEL_RE.fullmatch(key) or key.startswith("__"):
                raise RuntimeError(f"export: invalid label name {key!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RecordCollector(recs))
    return generate_latest(registry).decode("utf-8")


def _ordered_keys(labels: dict) -> list[str]:
    known = [k for k in LABEL_ORDER if k in labels]
    return known + sorted(k for k in labels if k not in LABEL_ORDER)


def to_jsonl(recs: list[Record], timestamp: float | None) -> str:
    """One JSON object per line, PerfKitBenchmarker's sample shape: metric, value, unit,
    labels (an object here; PKB's own JSON publisher flattens its metadata into a
    ``|key:value|`` string), timestamp (Unix seconds: when the run ended)."""
    lines = []
    for r in recs:
        labels = {k: r.labels[k] for k in _ordered_keys(r.labels)}
        lines.append(json.dumps({"metric": r.metric, "value": r.value, "unit": r.unit, "labels": labels,
                                 "timestamp": timestamp}, ensure_ascii=False, allow_nan=False))
    return "\n".join(lines) + ("\n" if lines else "")


def to_frame(recs: list[Record], timestamp: float | None):
    """One row per record: metric, value, unit, timestamp, then one column per label
    (empty where the label does not apply; the indicators' ``unit`` label is the
    ``unit`` column)."""
    import pandas as pd

    fixed = {"metric", "value", "unit", "timestamp"}
    present = {k for r in recs for k in r.labels} - fixed  # the unit label is the unit column
    label_cols = [k for k in LABEL_ORDER if k in present] + sorted(present - set(LABEL_ORDER))
    rows = [{"metric": r.metric, "value": r.value, "unit": r.unit, "timestamp": timestamp,
             **{k: r.labels.get(k) for k in label_cols}} for r in recs]
    df = pd.DataFrame(rows, columns=["metric", "value", "unit", "timestamp", *label_cols])
    df["value"] = df["value"].astype("float64")
    df["timestamp"] = df["timestamp"].astype("float64")
    return df


def render(run, fmt: str) -> bytes:
    """The export of a loaded run in one format, as bytes."""
    fmt = check_format(fmt)
    recs = records(run)
    ts = run_timestamp(run)
    if fmt == "prometheus":
        return to_prometheus(recs).encode("utf-8")
    if fmt == "jsonl":
        return to_jsonl(recs, ts).encode("utf-8")
    df = to_frame(recs, ts)
    if fmt == "csv":
        return df.to_csv(index=False).encode("utf-8")
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


#: File suffix -> format, for ``export -o FILE`` without ``--format``.
SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".prom": "prometheus", ".jsonl": "jsonl",
                  ".ndjson": "jsonl"}


def infer_format(fmt: str | None, output: str | None) -> str:
    """The format to write: ``fmt`` when given, else the one the output file's suffix
    names (``x.csv`` -> csv, ``x.parquet``, ``x.prom`` -> prometheus, ``x.jsonl``), else
    jsonl; ``-o x.csv`` alone writes CSV, not JSON lines under a .csv name."""
    if fmt is not None:
        return check_format(fmt)
    if output not in (None, "", "-"):
        return SUFFIX_FORMATS.get(Path(str(output)).suffix.lower(), "jsonl")
    return "jsonl"


def check_format(fmt: str) -> str:
    f = str(fmt or "").strip().lower()
    if f not in FORMATS:
        raise UserError(f"--format {fmt!r}: unknown format; choose one of {', '.join(FORMATS)}")
    return f


def check_output(fmt: str, output: str | None) -> Path | None:
    """The file to write, or None for stdout. Parquet is binary: it needs a file."""
    fmt = check_format(fmt)
    to_stdout = output in (None, "", "-")
    if to_stdout and fmt == "parquet":
        raise UserError("--format parquet is binary: give --output FILE (not stdout)")
    if to_stdout:
        return None
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {output}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"--output {output}: folder {path.parent} does not exist")
    return path


def write(data: bytes, path: Path | None) -> None:
    """To stdout, or atomically to a file (a temporary name that node_exporter's
    textfile collector ignores, then a rename), never half-written."""
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    from harness import atomic

    # The temporary name starts with "." and ends in ".tmp": the textfile collector skips it.
    atomic.write_bytes(path, data, what="--output")
