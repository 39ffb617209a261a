"""The probe registry: what a probe declares, how each backend measures it, and how
the harness finds both.

A probe is a class registered with :func:`register` (its *spec*, in
``probes/<family>.py``). It declares its name, family, parameter grid, the device
types it runs on, how many ranks it needs, the rules that skip a case, and a work
model (FLOPs and minimum bytes moved per repetition) so that every timed sample
converts to FLOP/s and B/s. It imports no framework.

A backend measures a probe with a *kernel builder* registered with :func:`kernel`
under the probe's name and the backend's name (``probes/torch/<family>.py``,
``probes/jax/<family>.py``, or a plugin's module): ``build(probe, ctx) -> Kernel``.
The worker calls the probe's ``skip_reason`` once, then the builder of the case's
backend (:func:`builder`); the backends a probe runs on are those with a builder
(:func:`backends_of`).

Probe modules are found through the ``coherence.probes`` entry point group (the
``probes`` package declares its modules there) and through plugin modules named by
the user (suite key ``plugins`` or the ``COHERENCE_PLUGINS`` environment variable).
The harness never imports a particular probe by name.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Iterable

from harness.errors import UserError

FAMILIES = ("memory", "gemm", "prefill", "decode", "transfer", "collective", "overhead", "composite")
BOUNDS = ("compute", "memory", "link", "latency")
ENTRY_POINT_GROUP = "coherence.probes"
PLUGINS_ENV = "COHERENCE_PLUGINS"


@dataclass(frozen=True)
class Param:
    """One declared parameter: its default grid, accepted type(s) and choices."""

    default: tuple
    type: type | tuple[type, ...]
    choices: tuple | None = None
    help: str = ""
    # "auto" lets the probe pick the value from the device (e.g. 4 x last-level cache).
    allow_auto: bool = False
    minimum: float | None = None
    # For structured strings such as "512x4096x4096".
    pattern: str | None = None
    # A parameter added to a probe after its cases were first run: at this value it is
    # left out of the case id, so the cases from before it existed keep their ids
    # (e.g. decode.projection's ``tp=1``). None: always in the id.
    implicit: Any = None

    def validate(self, value: Any, where: str) -> Any:
        if self.allow_auto and value == "auto":
            return value
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        # bool is an int in Python; a YAML `true` is never a size.
        if isinstance(value, bool) and bool not in types:
            raise UserError(f"{where}: expected {_type_names(types)}, got {value!r}")
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types):
            raise UserError(f"{where}: expected {_type_names(types)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: must be a finite number, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise UserError(f"{where}: {value!r} does not match the form {self.help or self.pattern}")
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"{where}: {value!r} is below the minimum {self.minimum:g}")
        return value


def _type_names(types: tuple[type, ...]) -> str:
    names = [t.__name__ for t in types]
    return " or ".join(names)


@dataclass(frozen=True)
class Work:
    """Work model of one repetition.

    ``flops`` counts floating-point operations (a fused multiply-add is 2); ``bytes``
    is the minimum traffic to the bounding memory or link (STREAM counting: each
    array element read or written once, no write-allocate). ``bound`` is the probe's
    own statement of its bounding resource where it knows it (a copy is memory-bound
    whatever the ridge); otherwise the harness places it against the device ridge.
    """

    flops: float = 0.0
    bytes: float = 0.0
    bound: str | None = None
    dtype: str | None = None
    # Collectives: {"op": "all_reduce", "size_bytes": S, "busbw_factor": f}; the harness
    # reports algbw = S / t and busbw = algbw * f (nccl-tests conventions).
    collective: dict | None = None
    # Which link a link-bound case's bytes crossed: None = the device's peer link
    # (link_Bps, e.g. NVLink), "host" = the host link (host_link_Bps, PCIe).
    link: str | None = None
    # The dtype whose nominal peak judges the case, where it differs from ``dtype``: a
    # bf16 case a CPU computes through an fp32 upcast runs on the fp32 FMA units, so it is
    # judged against the fp32 peak (probes.native). None = ``dtype``.
    peak_dtype: str | None = None

    @property
    def arithmetic_intensity(self) -> float | None:
        return self.flops / self.bytes if self.bytes else None


@dataclass
class CaseContext:
    """What a probe gets to prepare one case."""

    case_id: str
    probe: str
    params: dict
    device: str  # "cpu:0", "cuda:1"
    device_info: dict  # the device's dict, as its backend lists it (harness.backends)
    backend: str
    host: dict  # small facts about the host: last_level_cache_bytes, cpu flags, available memory
    seed: int = 0
    # Multi-rank cases: this process's rank in a torch.distributed group that is already
    # initialized (the default group), the group's size and every rank's device.
    rank: int = 0
    world_size: int = 1
    group_devices: list | None = None


class Kernel:
    """One prepared case. The timing engine calls :meth:`run` once per repetition.

    ``run`` may be asynchronous on a device; the timer synchronizes. ``before_each``
    runs untimed before every repetition (buffer rotation, cache flush). ``check``
    validates the output and raises :class:`~harness.errors.ProbeCheckFailed`.
    A kernel that times itself (clock-read gaps, say) overrides ``measure`` and returns
    the per-repetition durations in seconds.

    ``sample_columns`` holds per-repetition values besides the duration (a composite's
    compute and collective time per step, a request's TTFT): name -> one float per
    timed repetition, aligned with the durations (filled by a custom ``measure``). They
    become float columns of samples.parquet, one row per rank per repetition. A custom
    ``measure`` may also set ``sample_t_start_ns`` (host CLOCK_MONOTONIC start of each
    repetition) so its samples keep their timestamps.
    """

    # "device": CUDA events on GPUs, synchronize-then-clock elsewhere.
    # "host": synchronize-then-clock everywhere (for latencies that include the sync).
    timer: str = "device"
    extra: dict
    # Set by the probe's prepare(): the work model and the parameters with "auto"
    # replaced by what was actually used.
    work: Work | None = None
    params: dict | None = None

    def __init__(self) -> None:
        self.extra = {}
        self.sample_columns: dict[str, list[float]] = {}
        self.sample_t_start_ns: list[int] | None = None

    def run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def before_each(self) -> None:
        pass

    def check(self) -> None:
        pass

    def measure(self, policy) -> list[float] | None:
        return None

    def close(self) -> None:
        pass


class Probe:
    """Base class of every probe spec. Subclasses set the class attributes and implement
    :meth:`work` (and :meth:`skip_reason`, :meth:`components` where they apply); each
    backend's kernel for it is a builder registered with :func:`kernel`."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str] = ""
    # Only for probes written against the older interface (a plugin whose class defines
    # ``prepare`` itself): the backends that ``prepare`` serves. A probe with kernels
    # registered through :func:`kernel` runs on the backends that have one.
    backends: ClassVar[tuple[str, ...]] = ("torch",)
    device_types: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    # Ranks the probe needs. 0: as many as its `world_size` parameter says ("auto" =
    # every size from 2 up to the ranks available for the device type).
    ranks: ClassVar[int] = 1
    params: ClassVar[dict[str, Param]] = {}

    def work(self, params: dict, device_info: dict) -> Work:  # pragma: no cover - interface
        raise NotImplementedError

    def skip_reason(self, params: dict, device_info: dict, host: dict) -> str | None:
        """Why this case cannot run here (known before preparing), or None."""
        return None

    def prepare(self, ctx: CaseContext) -> Kernel:  # pragma: no cover - interface
        """The older interface: one method that builds the kernel for every backend in
        ``backends``. New probes register a builder per backend with :func:`kernel`."""
        raise NotImplementedError

    def components(self, params: dict, world_size: int) -> list[dict]:
        """The isolated cases a composite decomposes into, for the predicted time
        T_pred (INDICATORS.md §2): one dict per part, ``{"probe", "params", "count",
        "role"}`` with ``role`` one of ``compute``, ``collective``, ``transfer``, and
        optionally ``"rank"`` (the index in the composite's device group of the device
        the part runs on; default 0). ``params`` may leave out parameters whose default
        is a single value. The planner adds every such case the suite lacks; empty for
        probes that are not composites."""
        return []

    # -- grid handling ---------------------------------------------------------------
    @classmethod
    def validate_params(cls, overrides: dict, where: str) -> dict[str, list]:
        """The grid for this probe: declared defaults, replaced key by key by ``overrides``
        (each a value or a list of values), every value validated."""
        if not isinstance(overrides, dict):
            raise UserError(f"{where}: expected a mapping of parameter lists, got {overrides!r}")
        grid: dict[str, list] = {}
        for key in overrides:
            if key not in cls.params:
                known = ", ".join(cls.params) or "none"
                raise UserError(f"{where}: unknown parameter '{key}' for probe {cls.name} (known: {known})")
        for key, spec in cls.params.items():
            values = overrides.get(key, list(spec.default))
            if not isinstance(values, list):
                values = [values]
            if not values:
                raise UserError(f"{where}.{key}: empty list")
            grid[key] = [spec.validate(v, f"{where}.{key}") for v in values]
        return grid

    @classmethod
    def expand(cls, grid: dict[str, list]) -> list[dict]:
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


_REGISTRY: dict[str, type[Probe]] = {}
_PROBE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def register(cls: type[Probe]) -> type[Probe]:
    """Class decorator: adds a probe to the registry (idempotent on re-import)."""
    for attr in ("name", "family"):
        if not getattr(cls, attr, None):
            raise TypeError(f"probe {cls.__qualname__} has no {attr}")
    if not isinstance(cls.name, str) or not _PROBE_NAME.fullmatch(cls.name):
        # The name is part of every case id (``probe[params]@device``) and of globs.
        raise TypeError(f"probe {cls.__qualname__}: bad name {cls.name!r} (letters, digits, '_', '-', '.')")
    if cls.family not in FAMILIES:
        raise TypeError(f"probe {cls.name}: unknown family {cls.family!r}")
    existing = _REGISTRY.get(cls.name)
    # The same class imported again (a reload) replaces itself; any other class of that
    # name, even one with the same class name in another module, is a clash.
    if existing is not None and (existing.__qualname__, existing.__module__) != (cls.__qualname__, cls.__module__):
        raise TypeError(f"probe name {cls.name} registered twice ({existing.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


# -- kernels: how each backend measures a probe ------------------------------------------
KernelBuilder = Callable[[Probe, CaseContext], Kernel]


@dataclass(frozen=True)
class KernelEntry:
    """One backend's way of measuring one probe: ``build(probe, ctx) -> Kernel`` and
    the device types of that backend it runs on (None: the backend's default for the
    probe, see harness.backends)."""

    build: KernelBuilder
    device_types: tuple[str, ...] | None
    module: str


_KERNELS: dict[tuple[str, str], KernelEntry] = {}


def kernel(probes: str | Iterable[str], backend: str, *, device_types: Iterable[str] | None = None):
    """Decorator: ``build(probe, ctx) -> Kernel`` is how ``backend`` measures each probe
    named in ``probes`` (one name or several).

    The builder gets the probe instance (its spec: work model, shapes) and the case's
    :class:`CaseContext`; the case's skip rules have already been checked
    (``Probe.skip_reason``), so it only raises :class:`~harness.errors.ProbeSkip` for
    what it learns while preparing (free memory, say). It sets ``kernel.work`` and
    ``kernel.params`` where they differ from the spec's (``auto`` resolved).
    ``device_types`` narrows or widens the device types the probe plans on for this
    backend (JAX: ``("gpu", "tpu", "cpu")``). Registering another builder for the same
    (probe, backend) from another function is a TypeError; the same function imported
    again replaces itself."""
    names = (probes,) if isinstance(probes, str) else tuple(probes)
    types = tuple(device_types) if device_types is not None else None

    def register_builder(fn: KernelBuilder) -> KernelBuilder:
        for name in names:
            existing = _KERNELS.get((name, backend))
            if existing is not None and (existing.build.__qualname__, existing.module) != (fn.__qualname__, fn.__module__):
                raise TypeError(f"kernel for {name} on {backend} registered twice ({existing.module}, {fn.__module__})")
            _KERNELS[(name, backend)] = KernelEntry(fn, types, fn.__module__)
        return fn

    return register_builder


def _defines_prepare(cls: type[Probe]) -> bool:
    return cls.prepare is not Probe.prepare


def backends_of(cls: type[Probe]) -> tuple[str, ...]:
    """The backends that can measure ``cls``: those with a registered kernel builder,
    and for a probe of the older interface (its own ``prepare``) its ``backends``."""
    from harness import backends

    names = [b for (probe, b) in _KERNELS if probe == cls.name]
    if _defines_prepare(cls):
        names = [*cls.backends, *names]
    order = {name: i for i, name in enumerate(backends.known())}
    # In the order the backends were registered (torch, jax, then plugins'), not the
    # order their kernel modules happened to be imported in.
    return tuple(sorted(dict.fromkeys(names), key=lambda b: order.get(b, len(order))))


def kernel_entry(cls: type[Probe], backend: str) -> KernelEntry | None:
    """The registered builder of ``cls`` on ``backend``; for a probe of the older
    interface its ``prepare``; None when the backend cannot measure it."""
    entry = _KERNELS.get((cls.name, backend))
    if entry is not None:
        return entry
    if _defines_prepare(cls) and backend in cls.backends:
        return KernelEntry(lambda probe, ctx: probe.prepare(ctx), None, cls.__module__)
    return None


_loaded_modules: set[str] = set()


def plugin_modules(extra: Iterable[str] = ()) -> list[str]:
    env = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return list(dict.fromkeys([*env, *extra]))


# An absolute dotted module name (a relative name such as ``.probes`` has no package to
# be relative to here).
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def discover(plugins: Iterable[str] = ()) -> dict[str, type[Probe]]:
    """Import every probe module (entry points, then plugins) and return the registry.

    Plugins (suite key ``plugins``, COHERENCE_PLUGINS) are user code: a plugin whose
    name is not an absolute module name, that cannot be imported, or whose import fails
    in any way (RuntimeError, SyntaxError, a probe with a bad family or name, exit()) is
    a UserError naming the plugin, and whatever it had registered before failing is
    taken out again. The project's own entry-point modules only turn ImportError into a
    UserError: anything else there is a bug and keeps its traceback."""
    modules = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    if not modules:
        raise UserError(
            f"no probe modules found in entry point group '{ENTRY_POINT_GROUP}': "
            "install the project (pip install -e .)"
        )
    for module in modules:
        if module in _loaded_modules:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"cannot import probe module '{module}': {exc}") from None
        _loaded_modules.add(module)
    for module in plugin_modules(plugins):
        if module not in _loaded_modules:
            _import_plugin(module)
            _loaded_modules.add(module)
    _check_kernels()
    return dict(_REGISTRY)


def _check_kernels() -> None:
    """A kernel registered for a probe no module registers (a typo in a plugin's
    ``@kernel("memory.cpoy", ...)``) would never run and never say so: a UserError
    naming the module, the name and the probes of that family."""
    for (name, backend), entry in _KERNELS.items():
        if name not in _REGISTRY:
            family = name.split(".")[0]
            near = sorted(p for p in _REGISTRY if p.split(".")[0] == family) or sorted(_REGISTRY)
            raise UserError(f"{entry.module}: kernel for unknown probe '{name}' on backend {backend} "
                            f"(known: {', '.join(near)})")


def _import_plugin(module: object) -> None:
    where = f"plugin {module!r}"
    if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
        raise UserError(f"{where}: not an absolute module name (e.g. my_probes or pkg.probes)")
    before, kernels_before = dict(_REGISTRY), dict(_KERNELS)
    try:
        importlib.import_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: any failure is bad input
        _REGISTRY.clear()
        _REGISTRY.update(before)
        _KERNELS.clear()
        _KERNELS.update(kernels_before)
        detail = " ".join(str(exc).split()) or "no message"
        if isinstance(exc, SyntaxError) and exc.filename:
            detail = f"{exc.msg} ({exc.filename}:{exc.lineno})"
        raise UserError(f"{where}: import failed ({type(exc).__name__}: {detail[:300]})") from None


def get(name: str) -> type[Probe]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown probe '{name}' (known: {', '.join(sorted(_REGISTRY))})") from None


def case_id(probe: str, params: dict, device: str) -> str:
    """Readable, stable case id: ``gemm.square[n=1024,dtype=bf16]@cuda:0``."""
    cls = _REGISTRY.get(probe)
    specs = cls.params if cls is not None else {}
    inner = ",".join(
        f"{k}={_fmt(v)}" for k, v in params.items()
        if not (k in specs and specs[k].implicit is not None and v == specs[k].implicit)
    )
    return f"{probe}[{inner}]@{device}"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass
class PlannedCase:
    case_id: str
    probe: str
    family: str
    backend: str
    device: str  # one device, or a device group "cpu:0-3" for multi-rank cases
    params: dict
    timing: dict = field(default_factory=dict)
    skip: str | None = None
    world_size: int = 1
    group_devices: list = field(default_factory=list)
    # Composites: the isolated cases they decompose into, [{"case_id", "count", "role"}]
    # (carried into the case's extra as "components").
    components: list = field(default_factory=list)
    # Cases the suite did not name but a composite needs for T_pred: the composite
    # case ids that imply it (stored in cases.parquet as "implied_by").
    implied_by: list = field(default_factory=list)


def group_id(devices: list[str]) -> str:
    """``cuda:0-3`` for consecutive devices of one type, else ``cuda:0+cuda:2``; CPU
    ranks share the CPU and are numbered: four CPU ranks are ``cpu:0-3``."""
    if len(devices) == 1:
        return devices[0]
    types = {d.split(":")[0] for d in devices}
    if types == {"cpu"}:
        return f"cpu:0-{len(devices) - 1}"
    if len(types) == 1:
        idx = [int(d.split(":")[1]) for d in devices]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return f"{types.pop()}:{idx[0]}-{idx[-1]}"
    return "+".join(devices)

