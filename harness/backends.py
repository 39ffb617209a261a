"""Backends: the frameworks a case can run on, and what the harness needs of each.

A backend is a name (``--backend torch``), the devices it offers on this node, how a
case over several devices runs on it, the device types a probe plans on there, and
what a process does before it prepares one of its cases. The probes a backend can
measure are those with a kernel builder registered under its name
(:func:`harness.registry.kernel`); the backend itself knows no probe.

``torch`` and ``jax`` are defined here. A plugin module (suite key ``plugins``,
``COHERENCE_PLUGINS``) adds another with :func:`register` and its kernels with
:func:`harness.registry.kernel`, without editing ``harness/`` or ``probes/``
(tests/plugins/numpy_backend.py is one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from harness.errors import UserError

# How a case over several devices runs: "ranks", one process per device joined in a
# torch.distributed group (harness.ranks); "mesh", one process over a device mesh
# (JAX's shard_map); "none", the backend plans single-device cases only.
GROUPS = ("ranks", "mesh", "none")


def seed_host(seed: int) -> None:
    """Python's and NumPy's generators, seeded for a case (every backend)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))


@dataclass(frozen=True)
class Backend:
    """One framework cases run on.

    - ``devices(env)``: the device dicts of this backend on this node (``id``, ``type``,
      ``backend`` = name, as :func:`harness.environment.torch_devices` gives them); ``env``
      is the ``coherence env`` document (may be None). An empty list means the backend is
      not usable here; ``unusable(env)`` then says why.
    - ``groups``: one of :data:`GROUPS`.
    - ``device_types(cls)``: the device types of this backend a probe plans on when its
      kernel does not name them (default: the probe's ``device_types``).
    - ``enter_case(ctx)``: run in the process that prepares a case, before the skip
      rules and the kernel builder (seeds, the current device).
    - ``start_worker()``: run once when a case worker starts (import the framework
      there rather than inside the first case).
    - ``clock(device, kind, sync)``: the :class:`harness.timing.Clock` a case on
      ``device`` is timed with (``kind`` is the kernel's ``timer``, ``sync`` its
      wait-for-work-in-flight); default: synchronize (``sync``) then read the host's
      ``perf_counter_ns``, right for a framework whose calls return when done.
    """

    name: str
    devices: Callable[[dict | None], list[dict]]
    groups: str = "none"
    device_types: Callable[[type], tuple[str, ...]] | None = None
    enter_case: Callable[[Any], None] | None = None
    start_worker: Callable[[], None] | None = None
    unusable: Callable[[dict | None], str] | None = None
    clock: Callable[[str, str, Any], Any] | None = None

    def types_for(self, cls: type) -> tuple[str, ...]:
        return tuple(self.device_types(cls)) if self.device_types else tuple(cls.device_types)

    def clock_for(self, device: str, kind: str, sync=None):
        from harness import timing

        if self.clock is not None:
            return self.clock(device, kind, sync)
        return timing.HostClock(sync)

    def enter(self, ctx) -> None:
        if self.enter_case is not None:
            self.enter_case(ctx)
        else:
            seed_host(ctx.seed)


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (idempotent for the same definition; a different one under a
    taken name is a TypeError)."""
    if backend.groups not in GROUPS:
        raise TypeError(f"backend {backend.name}: groups {backend.groups!r} is not one of {', '.join(GROUPS)}")
    existing = _BACKENDS.get(backend.name)
    if existing is not None and existing != backend:
        same_source = all(getattr(getattr(existing, f), "__qualname__", None) == getattr(getattr(backend, f), "__qualname__", None)
                          for f in ("devices", "enter_case", "start_worker"))
        if not same_source:
            raise TypeError(f"backend {backend.name} registered twice")
    _BACKENDS[backend.name] = backend
    return backend


def get(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UserError(f"--backend: unknown backend '{name}' (known: {', '.join(known())}; a plugin's backend "
                        "is known once its module is loaded: the suite's plugins or COHERENCE_PLUGINS)") from None


def known() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def parse(spec: str | None) -> list[str]:
    """``--backend``: one registered backend or a comma list (``torch,jax``)."""
    names = [b.strip() for b in (spec or "torch").split(",") if b.strip()]
    if not names:
        raise UserError("--backend: empty")
    for name in names:
        get(name)
    return list(dict.fromkeys(names))


def devices_of(names: list[str], env: dict | None = None) -> list[dict]:
    """The devices of the chosen backends; a backend with none here is an error naming
    it and why (JAX not installed, say)."""
    available: list[dict] = []
    for name in names:
        backend = get(name)
        try:
            found = backend.devices(env)
        except Exception as exc:  # noqa: BLE001 - a plugin's device discovery is user code
            detail = " ".join(str(exc).split())[:300] or "no message"
            raise UserError(f"--backend {name}: listing its devices failed ({type(exc).__name__}: {detail})") from None
        if not found:
            why = backend.unusable(env) if backend.unusable else "not usable here (it offers no device on this node)"
            raise UserError(f"--backend {name}: {why}")
        available += [check_device(name, d) for d in found]
    return available


# The keys every device dict has (harness.environment.torch_devices gives more).
DEVICE_KEYS = ("id", "type", "backend")


def check_device(backend: str, device: object) -> dict:
    """One device dict a backend listed, checked: a mapping with ``id`` (prefixed
    ``<backend>:`` for every backend but torch, whose ids predate backends), ``type``
    (cpu, cuda, gpu, tpu, ...: what probes' device types match) and ``backend`` = the
    backend's name. A UserError naming the backend and the device otherwise."""
    where = f"--backend {backend}: device {device!r}"
    if not isinstance(device, dict):
        raise UserError(f"{where}: expected a mapping with keys {', '.join(DEVICE_KEYS)}")
    missing = [k for k in DEVICE_KEYS if not isinstance(device.get(k), str) or not device.get(k)]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (every device has {', '.join(DEVICE_KEYS)})")
    if device["backend"] != backend:
        raise UserError(f"{where}: its backend is {device['backend']!r}, not {backend!r}")
    if backend != "torch" and not device["id"].startswith(f"{backend}:"):
        raise UserError(f"{where}: its id must start with '{backend}:' (e.g. {backend}:{device['type']}:0), "
                        "so its case ids never collide with another backend's")
    return device


# -- torch -----------------------------------------------------------------------------
def _torch_devices(env: dict | None) -> list[dict]:
    from harness import environment

    return environment.torch_devices()


def _torch_enter(ctx) -> None:
    seed_host(ctx.seed)
    import torch

    torch.manual_seed(ctx.seed)
    if ctx.device.startswith("cuda"):
        # Events record on the current device's stream: make it the case's device.
        torch.cuda.set_device(torch.device(ctx.device))


def _torch_start() -> None:
    import torch  # noqa: F401 - import once per worker, not inside the first case


# -- JAX -------------------------------------------------------------------------------
def _jax_devices(env: dict | None) -> list[dict]:
    from harness import environment

    return environment.jax_devices()


def _jax_unusable(env: dict | None) -> str:
    why = ((env or {}).get("frameworks") or {}).get("jax", {}).get("reason") or "no JAX device found"
    return f"JAX is not usable here ({why}); install it with pip install 'coherence[jax]'"


def jax_device_types(cls: type) -> tuple[str, ...]:
    """JAX platforms a probe runs on when its JAX kernel names none: its torch device
    types with cuda read as JAX's ``gpu``, plus ``tpu`` for probes that run on
    accelerators."""
    types = [{"cuda": "gpu"}.get(t, t) for t in cls.device_types]
    if "gpu" in types:
        types.append("tpu")
    return tuple(dict.fromkeys(types))


def _framework_clock(device: str, kind: str, sync=None):
    """CUDA events or synchronize-then-clock for torch devices, JAX's block-until-ready
    clock for ``jax:`` devices (harness.timing.clock_for)."""
    from harness import timing

    return timing.clock_for(device, kind, sync)


register(Backend("torch", _torch_devices, groups="ranks", enter_case=_torch_enter, start_worker=_torch_start,
                 clock=_framework_clock))
register(Backend("jax", _jax_devices, groups="mesh", device_types=jax_device_types, unusable=_jax_unusable,
                 clock=_framework_clock))
