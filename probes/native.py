"""Whether a CPU has a native arithmetic path for a dtype, and what runs it otherwise.

A CPU without bf16/fp16 arithmetic instructions still gets measured on those dtypes:
the data stays in the dtype (so the bytes moved are the dtype's), and every product is
computed from an fp32 copy, rounded back to the dtype ("emulated via fp32 upcast").
The products run on the fp32 FMA units, so the case is judged against the fp32 peak
(``Work.peak_dtype``), not against a bf16 peak the CPU does not have. Left to
themselves, framework bf16/fp16 matmuls on such CPUs fall to fallback kernels two orders
of magnitude slower than fp32 (measured here: torch 2.13 bf16 1024³ GEMM at 1.2 GFLOP/s
with oneDNN held to AVX2 by ONEDNN_MAX_CPU_ISA, 210 GFLOP/s through an fp32 upcast on the
same two cores), which would time the fallback, not the CPU.

The decision is a function of the host description the probes get (``host["cpu_isa"]``,
the cpuinfo flags harness.environment collected), never of the live CPU, so tests can
hand it any machine. ``COHERENCE_CPU_FLAGS_OFF=flag,flag`` (read by
harness.runner.host_facts) hides flags from it, to run a host as one without them.
Which flags mean a native path:

- bf16: x86 AVX512_BF16 (VDPBF16PS, Cooper Lake, Zen 4+) or AMX-BF16 (Sapphire Rapids+)
  (Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2, VDPBF16PS /
  TDPBF16PS); Arm FEAT_BF16 (cpuinfo ``bf16``; Arm Architecture Reference Manual,
  BFDOT/BFMMLA), or SVE's ``svebf16``.
- fp16: x86 AVX512-FP16 (Sapphire Rapids+) or AMX-FP16 (Granite Rapids). F16C only
  converts, so it is no arithmetic path. Arm half-precision arithmetic (``asimdhp``) is
  not counted: framework fp16 GEMMs there do not reliably use it, and an upcast never
  runs slower than the fp32 path, while a false "native" can run 100x slower.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: cpuinfo flag names (as harness.environment reports them in ``cpu_isa``) any one of
#: which gives the dtype a native arithmetic path on a CPU.
NATIVE_FLAGS: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16", "bf16", "svebf16", "sve_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
}

#: The dtype whose arithmetic an emulated dtype runs through.
UPCAST_TO = "fp32"


@dataclass(frozen=True)
class NativePath:
    """How a case's dtype is computed on its device.

    ``native``: the device has arithmetic for the dtype itself. ``compute_dtype``: the
    dtype the products are computed in (the case's own dtype when native, else fp32).
    ``via``: one line saying which path and why, for ``extra`` and the report.
    """

    native: bool
    compute_dtype: str
    via: str
    # Whether the answer came from a flag check (a CPU and a dtype that needs one); only
    # then does the case record it, so fp32 and GPU cases carry no ``native`` key.
    checked: bool = False

    def extra(self) -> dict:
        """The ``extra`` entries a case records: ``native`` and ``native_via`` where checked;
        for an emulated dtype also ``judged_against`` (the dtype whose peak judges it)."""
        if not self.checked:
            return {}
        out = {"native": self.native, "native_via": self.via}
        if not self.native:
            out["judged_against"] = f"{self.compute_dtype} peak (the products run on its FMA units)"
        return out

    def record(self, work, extra: dict):
        """Put the path into a case: ``extra`` gets :meth:`extra`; returns ``work`` (a
        frozen harness.registry.Work) with ``peak_dtype`` set to the compute dtype for an
        emulated case, so the runner judges it by that peak; else ``work`` unchanged."""
        extra.update(self.extra())
        if self.native or work is None:
            return work
        return replace(work, peak_dtype=self.compute_dtype)


def cpu_native(dtype: str, host: dict | None) -> NativePath:
    """The native path of ``dtype`` on a CPU described by ``host`` (``host["cpu_isa"]``:
    flag name -> bool). fp32/fp64 are always native; bf16/fp16 are native only with one of
    :data:`NATIVE_FLAGS`; otherwise they are emulated through :data:`UPCAST_TO`.
    Never raises: an unknown flag set counts as no native path (the safe, fast choice)."""
    wanted = NATIVE_FLAGS.get(dtype)
    if wanted is None:
        return NativePath(True, dtype, f"{dtype} native")
    isa = (host or {}).get("cpu_isa") or {}
    have = [f for f in wanted if isa.get(f)]
    if have:
        return NativePath(True, dtype, f"{dtype} native ({'/'.join(have)})", checked=True)
    return NativePath(False, UPCAST_TO,
                      f"{dtype} emulated via {UPCAST_TO} upcast: no {'/'.join(wanted)} on this CPU",
                      checked=True)


def native_path(dtype: str, device_info: dict | None, host: dict | None) -> NativePath:
    """:func:`cpu_native` for a CPU device; accelerators are taken as native here (their
    own unsupported dtypes are skip rules of the probes, e.g. bf16 below CUDA cc 8.0)."""
    if (device_info or {}).get("type") == "cpu":
        return cpu_native(dtype, host)
    return NativePath(True, dtype, f"{dtype} native")
