"""Planning: the devices a run uses and the cases it runs.

``--devices`` against what the chosen backends offer (:func:`resolve_devices`), the
suite's entries filtered by ``--probe`` (:func:`select_probes`), and the cases =
probe × parameter point × device (or device group) for each backend
(:func:`plan`), with the isolated parts every composite decomposes into
(:func:`add_components`). A probe plans on a backend only where a kernel for it is
registered there (harness.registry.kernel_entry); multi-device cases follow the
backend's ``groups`` (harness.backends). The runner (harness.runner) executes the
plan; nothing here runs a case.
"""

from __future__ import annotations

import os

from harness import backends, registry
from harness.config import Suite
from harness.errors import UserError


# -- devices ---------------------------------------------------------------------------
def resolve_devices(spec: str | None, available: list[dict]) -> list[dict]:
    """``--devices`` (comma list of ``cpu``, ``cuda``, ``cuda:1``, ``all``) against the
    devices this node has. Default: all of them."""
    if not spec or spec.strip() == "all":
        return list(available)
    by_id = {d["id"]: d for d in available}
    chosen: list[dict] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if ":" in token:
            # an id (cuda:1, jax:tpu:3) or a JAX platform (jax:cpu: all its devices)
            matches = [by_id[token]] if token in by_id else [d for d in available if d["id"].startswith(token + ":")]
        else:
            # a device type (cpu, cuda, tpu) or a backend (jax: all of its devices)
            matches = [d for d in available if d["type"] == token or d.get("backend") == token and token != "torch"]
        if not matches:
            have = ", ".join(by_id) or "none"
            raise UserError(f"--devices: no device '{token}' on this node (available: {have})")
        chosen.extend(d for d in matches if d not in chosen)
    return chosen


# -- planning --------------------------------------------------------------------------
def select_probes(suite: Suite, names: tuple[str, ...]) -> list:
    """Suite entries filtered by ``--probe`` (a probe name or a family name)."""
    if not names:
        return list(suite.probes)
    known = registry.discover(suite.plugins)
    for name in names:
        if name not in known and name not in registry.FAMILIES:
            raise UserError(f"--probe: unknown probe or family '{name}' (known: {', '.join(sorted(known))})")
    chosen = [p for p in suite.probes if p.name in names or known[p.name].family in names]
    if not chosen:
        raise UserError(f"--probe {','.join(names)}: none of these is in suite '{suite.name}'")
    return chosen


def plan(
    suite: Suite,
    entries: list,
    devices: list[dict],
    backend: str,
    host: dict,
    cpu_ranks: int | None = None,
) -> list[registry.PlannedCase]:
    """Cases = probe × parameter point × device (or device group for multi-rank probes).

    ``backend`` is one backend or a comma list (``torch,jax``): each plans its cases on
    its own devices (a device dict's ``backend``, torch when absent)."""
    names = [b.strip() for b in backend.split(",") if b.strip()]
    if len(names) > 1:
        return [c for b in names for c in plan(suite, entries, devices, b, host, cpu_ranks)]
    if backends.get(backend).groups == "mesh":
        return plan_mesh(entries, [d for d in devices if d.get("backend") == backend], backend, host)
    devices = [d for d in devices if d.get("backend", "torch") == backend]
    ranks_ok = backends.get(backend).groups == "ranks"
    limit = rank_limit(host)
    if limit is not None and cpu_ranks and cpu_ranks != suite.cpu_ranks and cpu_ranks > limit[0]:
        # Asked for on the command line: refused. A suite's own cpu_ranks (written for
        # some other machine) plans, and the sizes above the limit are skipped with why.
        raise UserError(f"--cpu-ranks {cpu_ranks}: above this machine's planning limit of {limit[1]}")
    cases: list[registry.PlannedCase] = []
    for entry in entries:
        cls = registry.get(entry.name)
        types = device_types(cls, backend)
        if not types or (cls.ranks != 1 and not ranks_ok):
            continue
        timing = {**entry.timing.as_dict(), "timeout_s": entry.timeout_s}
        for params in cls.expand(entry.grid):
            if cls.ranks == 1:
                cases += _single_device_cases(cls, params, [d for d in devices if d["type"] in types], backend,
                                              timing, host)
                continue
            for dev_type in dict.fromkeys(d["type"] for d in devices):
                if dev_type not in types:
                    continue
                typed = [d for d in devices if d["type"] == dev_type]
                available = (cpu_ranks or suite.cpu_ranks) if dev_type == "cpu" else len(typed)
                if dev_type == "cpu" and limit is not None:
                    # world_size "auto" plans sizes up to the limit; a size the suite
                    # names above it is planned skipped, with the limit as its reason.
                    available = min(available, limit[0])
                for ws in _world_sizes(cls, params, available):
                    point = {**params, "world_size": ws} if "world_size" in params else params
                    skip = None
                    if dev_type == "cpu":
                        group = ["cpu:0"] * ws
                        if limit is not None and ws > limit[0]:
                            skip = f"needs {ws} Gloo ranks, above this machine's planning limit of {limit[1]}"
                    else:
                        group = [d["id"] for d in typed[:ws]]
                    if len(group) < ws:
                        skip = f"needs {ws} {dev_type} devices, {len(typed)} selected"
                        # The ids a node with enough devices would give, so the skipped
                        # case pairs with the same case run elsewhere (compare, fleet).
                        last = max(int(d["id"].split(":")[1]) for d in typed) if typed else -1
                        group = group + [f"{dev_type}:{last + 1 + k}" for k in range(ws - len(group))]
                    gid = registry.group_id(group)
                    cases.append(registry.PlannedCase(
                        case_id=registry.case_id(cls.name, point, gid),
                        probe=cls.name, family=cls.family, backend=backend, device=gid,
                        params=point, timing=timing,
                        skip=skip or cls().skip_reason(point, typed[0], host),
                        world_size=ws, group_devices=group,
                    ))
    add_components(cases, suite, devices, backend, host)
    # Multi-rank cases grouped by their group shape, so a rank pool serves a run of
    # cases instead of being restarted for each.
    cases.sort(key=lambda c: (c.world_size > 1, c.world_size, tuple(c.group_devices)))
    return cases


def _single_device_cases(cls, params: dict, devices: list[dict], backend: str, timing: dict,
                         host: dict) -> list[registry.PlannedCase]:
    """One case of a single-device probe at one parameter point on each of ``devices``,
    its skip reason (if any) decided now from that device and the host."""
    return [
        registry.PlannedCase(
            case_id=registry.case_id(cls.name, params, dev["id"]),
            probe=cls.name, family=cls.family, backend=backend, device=dev["id"],
            params=params, timing=timing, skip=cls().skip_reason(params, dev, host),
            group_devices=[dev["id"]],
        )
        for dev in devices
    ]


def component_point(cls, given: dict, where: str) -> dict:
    """A composite's component parameters as one full parameter point of ``cls``, in
    its declared order (so the case id is the one the suite would give it)."""
    points = cls.expand(cls.validate_params(dict(given), where))
    if len(points) != 1:
        open_keys = [k for k in cls.params if k not in given]
        raise UserError(f"{where}: names {len(points)} cases, not one (give {', '.join(open_keys)})")
    return points[0]


def add_components(cases: list, suite: Suite, devices: list[dict], backend: str, host: dict) -> None:
    """Every isolated case a planned composite decomposes into (``Probe.components``),
    added where the plan lacks it, marked ``implied_by`` the composite; each composite
    gets ``components`` = [{"case_id", "count", "role"}] with the exact planned ids, so
    T_pred = Σ count × p50(case) needs no shape re-derived. An implied case takes its
    probe's timing from the suite entry when the suite names the probe, else the
    composite's."""
    by_id = {c.case_id: c for c in cases}
    dev_by_id = {d["id"]: d for d in devices}
    suite_timing = {e.name: {**e.timing.as_dict(), "timeout_s": e.timeout_s} for e in suite.probes}
    for case in list(cases):
        cls = registry.get(case.probe)
        if case.skip:
            continue
        parts = cls().components(case.params, case.world_size)
        planned = []
        for i, part in enumerate(parts):
            comp = registry.get(part["probe"])
            where = f"{case.case_id}: component {i} ({part['probe']})"
            if not device_types(comp, backend):
                continue
            params = component_point(comp, part.get("params") or {}, where)
            if comp.ranks == 1:
                group = [case.group_devices[int(part.get("rank", 0))]]
                ws, device = 1, group[0]
            else:
                ws = comp.ranks if comp.ranks > 1 else int(params["world_size"])
                group = list(case.group_devices[:ws])
                device = registry.group_id(group)
            cid = registry.case_id(comp.name, params, device)
            existing = by_id.get(cid)
            if existing is None:
                info = dev_by_id.get(group[0]) or {"id": group[0], "type": group[0].split(":")[0]}
                existing = registry.PlannedCase(
                    case_id=cid, probe=comp.name, family=comp.family, backend=backend, device=device,
                    params=params, timing=dict(suite_timing.get(comp.name, case.timing)),
                    skip=comp().skip_reason(params, info, host), world_size=ws, group_devices=group,
                    implied_by=[case.case_id],
                )
                cases.append(existing)
                by_id[cid] = existing
            elif existing.implied_by and case.case_id not in existing.implied_by:
                existing.implied_by.append(case.case_id)
            planned.append({"case_id": cid, "count": part["count"], "role": part["role"]})
        case.components = planned


def device_types(cls, backend: str) -> tuple[str, ...]:
    """The device types of ``backend`` that probe ``cls`` plans on: those its kernel on
    that backend names, else the backend's default for the probe; empty when the
    backend has no kernel for it."""
    entry = registry.kernel_entry(cls, backend)
    if entry is None:
        return ()
    return entry.device_types or backends.get(backend).types_for(cls)


def jax_process_count() -> int:
    """Hosts of a multi-host JAX run (COHERENCE_JAX_NUM_PROCESSES), else 1."""
    value = os.environ.get("COHERENCE_JAX_NUM_PROCESSES", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def plan_mesh(entries: list, devices: list[dict], backend: str, host: dict) -> list[registry.PlannedCase]:
    """The cases of a mesh backend (JAX). Single-device cases run on every device of a
    platform the probe supports, except that the CPU's forced host devices share one
    CPU: only ``jax:cpu:0`` gets them. Multi-device cases (collectives, KV between
    devices) run in one process over a mesh of the first ``world_size`` devices of a
    platform, ids ``jax:cpu:0-3``; every size from 2 up to the devices there (times the
    hosts of a multi-host run) for ``world_size: auto``."""
    cases: list[registry.PlannedCase] = []
    for entry in entries:
        cls = registry.get(entry.name)
        types = device_types(cls, backend)
        if not types:
            continue
        timing = {**entry.timing.as_dict(), "timeout_s": entry.timeout_s}
        for params in cls.expand(entry.grid):
            if cls.ranks == 1:
                mine = [d for d in devices if d["type"] in types and not (d["type"] == "cpu" and d.get("index", 0) > 0)]
                cases += _single_device_cases(cls, params, mine, backend, timing, host)
                continue
            for dev_type in dict.fromkeys(d["type"] for d in devices):
                if dev_type not in types:
                    continue
                typed = [d for d in devices if d["type"] == dev_type]
                available = len(typed) * jax_process_count()
                for ws in _world_sizes(cls, params, available):
                    point = {**params, "world_size": ws} if "world_size" in params else params
                    skip = None
                    if ws > available:
                        skip = f"needs {ws} JAX {dev_type} devices, {available} available"
                    gid = f"{backend}:{dev_type}:0-{ws - 1}"
                    cases.append(registry.PlannedCase(
                        case_id=registry.case_id(cls.name, point, gid),
                        probe=cls.name, family=cls.family, backend=backend, device=gid,
                        params=point, timing=timing,
                        skip=skip or cls().skip_reason(point, typed[0], host),
                        world_size=ws, group_devices=[f"{backend}:{dev_type}:{i}" for i in range(ws)],
                    ))
    cases.sort(key=lambda c: (c.world_size > 1, c.world_size))
    return cases


# Gloo ranks per usable core the planner allows: CPU ranks are processes that spin in
# their collectives, so past two per core a case measures the scheduler, not the link.
GLOO_RANKS_PER_CORE = 2


def rank_limit(host: dict) -> tuple[int, str] | None:
    """The most Gloo (CPU) ranks a case may plan on this machine and how that was
    reached, from the host facts (:func:`host_facts`): GLOO_RANKS_PER_CORE × the usable
    cores (the affinity set, capped by the cgroup CPU quota as
    harness.environment computes them). None when the host facts do not say (nothing is
    limited then). GPU groups are limited by the device count instead (see :func:`plan`)."""
    cores = host.get("usable_cores") if isinstance(host, dict) else None
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        return None
    limit = GLOO_RANKS_PER_CORE * cores
    return limit, f"{limit} ({GLOO_RANKS_PER_CORE} × {cores} usable cores{host.get('usable_cores_note', '')})"


def _world_sizes(cls, params: dict, available: int) -> list[int]:
    """The world sizes of a multi-rank probe at one parameter point: its fixed rank
    count, the ``world_size`` parameter, or for "auto" every size from 2 up to the
    ranks available."""
    if cls.ranks > 1:
        return [cls.ranks]
    ws = params.get("world_size", "auto")
    if ws == "auto":
        # Composites include 1 rank (the unsharded reference of scaling efficiency).
        return list(range(getattr(cls, "min_world_size", 2), available + 1))
    return [int(ws)]


def host_facts(env: dict) -> dict:
    """The few host facts probes size themselves by (plain values, no sources)."""

    def value(*path, default=None):
        node = env
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        if isinstance(node, dict) and "value" in node and "source" in node:
            return node["value"]
        return node

    flags = value("cpu", "isa", default={}) or {}
    isa = {k: (v["value"] if isinstance(v, dict) else v) for k, v in flags.items()}
    # COHERENCE_CPU_FLAGS_OFF=avx512_bf16,amx_bf16 makes the probes see those cpuinfo flags
    # as absent: how to run a host as one without them (a Zen 3 on a Zen 4), e.g. to time
    # the emulated bf16 path (probes.native). Only the probes' native-path decisions read it.
    for off in os.environ.get("COHERENCE_CPU_FLAGS_OFF", "").split(","):
        if off.strip():
            isa[off.strip()] = False
    # Usable logical CPUs (affinity set), capped by the cgroup CPU quota (rounded down,
    # at least 1): what rank_limit plans Gloo ranks against.
    usable, note = value("cpu", "usable_cores"), ""
    quota = value("cpu", "cgroup_cpu_limit_cores")
    if isinstance(quota, (int, float)) and not isinstance(quota, bool) and quota > 0 and (
            not isinstance(usable, int) or quota < usable):
        usable, note = max(1, int(quota)), f", cgroup CPU quota {quota:g}"
    return {
        "usable_cores": usable if isinstance(usable, int) and not isinstance(usable, bool) else None,
        "usable_cores_note": note,
        "last_level_cache_bytes": value("cpu", "last_level_cache_bytes"),
        "cpu_isa": isa,
        "memory_available_bytes": value("memory", "available_bytes"),
        "cpu_model": value("cpu", "model_name"),
    }
