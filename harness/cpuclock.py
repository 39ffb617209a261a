"""Measure the CPU core clock when the OS can't say (no cpufreq in most VMs).

In a VM /proc/cpuinfo's "cpu MHz" is the TSC rate, usually the base clock, while the
cores boost well above it; a CPU peak derived from it understates the nominal and puts
GEMMs above 100 % of "peak". This runs a chain of dependent 64-bit integer adds
(latency 1 cycle on every x86-64 core since the Pentium Pro) as machine code on one
core: cycles = adds, so clock = adds / time. The best of several tries is the highest
clock the core reached (single-core boost), an upper bound for the all-core clock, so
a peak derived from it is never too low.

x86-64 Linux only; elsewhere (or where executable memory is refused) it returns None.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform
import time

ADDS_PER_ITERATION = 8
# mov rcx, rdi; xor eax, eax; loop: 8 x (add rax, 1); dec rcx; jnz loop; ret
_X86_64_CODE = (
    bytes.fromhex("4889f9" "31c0")
    + bytes.fromhex("4883c001") * ADDS_PER_ITERATION
    + bytes.fromhex("48ffc9")
    + bytes([0x75, (-(4 * ADDS_PER_ITERATION + 3 + 2)) & 0xFF])
    + bytes.fromhex("c3")
)


@functools.lru_cache(maxsize=None)
def measure_clock_hz(iterations: int = 5_000_000, tries: int = 7) -> tuple[float | None, str]:
    """(clock in Hz, how it was obtained) or (None, why not)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return None, f"no clock measurement on {platform.system()}/{platform.machine()}"
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError) as exc:
        return None, f"executable memory refused ({exc})"
    try:
        buf.write(_X86_64_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        chain = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)
        if chain(10) != 10 * ADDS_PER_ITERATION:  # the code did what it should
            return None, "add-chain self-test failed"
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter_ns()
            chain(iterations)
            best = min(best, (time.perf_counter_ns() - t0) * 1e-9)
        del chain
        hz = iterations * ADDS_PER_ITERATION / best
        return hz, (
            f"measured: chain of {iterations * ADDS_PER_ITERATION:.3g} dependent 64-bit adds "
            f"(1 cycle each), best of {tries} on one core"
        )
    finally:
        try:
            buf.close()
        except BufferError:
            pass
