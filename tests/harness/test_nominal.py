"""Nominal peaks: the accelerator table, CPU derivation, overrides and roofline helpers."""

from __future__ import annotations

import textwrap

import pytest

from harness.errors import UserError
from harness.nominal import (
    DEFAULT_TABLE_PATH,
    DTYPES,
    bound_for,
    load_table,
    nominal_for,
    ridge,
    roofline_fraction,
)


@pytest.fixture(scope="module")
def table():
    return load_table()


def dev(name, type_="cuda", id_="cuda:0"):
    return {"id": id_, "type": type_, "name": name}


# ------------------------------------------------------------------------------ table

def test_table_loads_and_validates(table):
    rows = table["accelerators"]
    assert len(rows) >= 17
    for r in rows:
        assert r["source"] and r["match"] and r["compute"]
        assert set(r["compute"]) <= set(DTYPES)
        assert all(isinstance(v, float) and v > 0 for v in r["compute"].values())
        assert r["memory_Bps"] is None or isinstance(r["memory_Bps"], float)
    assert load_table(DEFAULT_TABLE_PATH) is table  # cached


REAL_NAMES = [
    # torch.cuda.get_device_name
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe 80GB"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"),
    ("NVIDIA H200", "NVIDIA H200 SXM 141GB"),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM4 80GB"),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 SXM4 40GB"),
    ("NVIDIA A100-PCIE-40GB", "NVIDIA A100 PCIe 40GB"),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe 80GB"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("NVIDIA L40", "NVIDIA L40"),
    ("AMD Instinct MI300X", "AMD Instinct MI300X"),
    # JAX device_kind
    ("TPU v4", "Google TPU v4"),
    ("TPU v5 lite", "Google TPU v5e"),
    ("TPU v5e", "Google TPU v5e"),
    ("TPU v5", "Google TPU v5p"),
    ("TPU v5p", "Google TPU v5p"),
    ("TPU v6 lite", "Google TPU v6e (Trillium)"),
    ("TPU v6e", "Google TPU v6e (Trillium)"),
]


@pytest.mark.parametrize("name,row", REAL_NAMES)
def test_real_names_resolve_to_their_row(table, name, row):
    type_ = "tpu" if name.startswith("TPU") else "cuda"
    n = nominal_for(dev(name, type_), table=table)
    assert n["row"] == row
    assert n["kind"] == "datasheet"
    assert n["device_class"] == name
    assert n["source"]
    assert n["compute_flops"]["bf16"] > 0
    assert n["memory_Bps"] > 0


def test_spot_values(table):
    h100 = nominal_for(dev("NVIDIA H100 80GB HBM3"), table=table)
    assert h100["compute_flops"]["bf16"] == pytest.approx(989.4e12)
    assert h100["compute_flops"]["fp8"] == pytest.approx(1978.9e12)
    assert h100["compute_flops"]["tf32"] == pytest.approx(494.7e12)
    assert h100["memory_Bps"] == pytest.approx(3.35e12)
    assert h100["link_Bps"] == pytest.approx(450e9)  # 900 GB/s bidirectional / 2
    assert h100["host_link_Bps"] == pytest.approx(64e9)
    h200 = nominal_for(dev("NVIDIA H200"), table=table)
    assert h200["compute_flops"]["bf16"] == pytest.approx(989.4e12)
    assert h200["memory_Bps"] == pytest.approx(4.8e12)
    a100 = nominal_for(dev("NVIDIA A100 80GB PCIe"), table=table)
    assert a100["memory_Bps"] == pytest.approx(1.935e12)
    assert "fp8" not in a100["compute_flops"]  # no FP8 on Ampere: absent, never 0
    assert nominal_for(dev("NVIDIA A100-SXM4-80GB"), table=table)["memory_Bps"] == \
        pytest.approx(2.039e12)
    l4 = nominal_for(dev("NVIDIA L4"), table=table)
    assert l4["compute_flops"]["fp8"] == pytest.approx(242.5e12)
    assert l4["link_Bps"] is None
    mi = nominal_for(dev("AMD Instinct MI300X"), table=table)
    assert mi["compute_flops"]["bf16"] == pytest.approx(1307.4e12)
    assert mi["memory_Bps"] == pytest.approx(5.3e12)
    v5e = nominal_for(dev("TPU v5 lite", "tpu", "tpu:0"), table=table)
    assert v5e["compute_flops"] == {"bf16": pytest.approx(197e12), "int8": pytest.approx(393e12)}
    assert v5e["memory_Bps"] == pytest.approx(819e9)
    v6e = nominal_for(dev("TPU v6 lite", "tpu", "tpu:0"), table=table)
    assert v6e["compute_flops"]["bf16"] == pytest.approx(918e12)


def test_nvl_and_pcie_do_not_fall_into_sxm(table):
    for name in ("NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200 NVL"):
        n = nominal_for(dev(name), table=table)
        assert "SXM" not in n["row"], name
    assert nominal_for(dev("NVIDIA H100 PCIe"), table=table)["memory_Bps"] == \
        pytest.approx(2.0e12)
    assert nominal_for(dev("NVIDIA H100 NVL"), table=table)["memory_Bps"] == \
        pytest.approx(3.9e12)
    # L4 does not swallow L40/L40S, and H200 does not swallow GH200.
    assert nominal_for(dev("NVIDIA L40S"), table=table)["row"] == "NVIDIA L40S"
    assert nominal_for(dev("NVIDIA GH200 480GB"), table=table)["kind"] == "unknown"


def test_unknown_device_class(table):
    n = nominal_for(dev("NVIDIA Foo"), table=table)
    assert n["kind"] == "unknown"
    assert n["compute_flops"] == {}
    assert n["memory_Bps"] is None and n["link_Bps"] is None and n["host_link_Bps"] is None
    assert "no row" in n["notes"] and "NVIDIA Foo" in n["notes"]


def test_result_does_not_alias_the_table(table):
    n = nominal_for(dev("NVIDIA H100 80GB HBM3"), table=table)
    n["compute_flops"]["bf16"] = 1.0
    again = nominal_for(dev("NVIDIA H100 80GB HBM3"), table=table)
    assert again["compute_flops"]["bf16"] == pytest.approx(989.4e12)


# ------------------------------------------------------------------------------ CPU

CPU_DEV = {"id": "cpu:0", "type": "cpu", "name": "cpu"}

ZEN4_FLAGS = ("fpu sse sse2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl "
              "avx512_bf16 avx512_vnni avx512vbmi").split()


def cpu_desc(**kw):
    base = {"vendor": "AuthenticAMD", "family": 25, "model": 17, "model_name": "AMD EPYC",
            "flags": ZEN4_FLAGS, "cores": 2, "max_mhz": 2596.0,
            "mhz_source": "/proc/cpuinfo cpu MHz"}
    base.update(kw)
    return base


def test_cpu_zen4_this_machine(table):
    n = nominal_for(CPU_DEV, cpu=cpu_desc(), table=table)
    assert n["kind"] == "derived"
    assert n["rule"] == "amd-zen4"
    assert n["compute_flops"]["fp32"] == pytest.approx(2 * 2.596e9 * 32)
    assert n["compute_flops"]["bf16"] == pytest.approx(2 * 2.596e9 * 64)
    assert n["compute_flops"]["fp64"] == pytest.approx(2 * 2.596e9 * 16)
    assert "fp16" not in n["compute_flops"]  # no avx512_fp16 / AMX-FP16 on Zen 4
    assert "2 cores × 2.596 GHz × 32 FLOP/cycle" in n["notes"]
    assert "Zen 4" in n["notes"] and "/proc/cpuinfo" in n["notes"]
    assert n["memory_Bps"] is None  # no reliable nominal for a CPU


def test_cpu_zen4_without_avx512_bf16_has_no_bf16(table):
    flags = [f for f in ZEN4_FLAGS if f != "avx512_bf16"]
    n = nominal_for(CPU_DEV, cpu=cpu_desc(flags=flags), table=table)
    assert "bf16" not in n["compute_flops"]
    assert n["compute_flops"]["fp32"] == pytest.approx(2 * 2.596e9 * 32)


SPR_FLAGS = ("sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 "
             "avx512_fp16 amx_tile amx_bf16 amx_int8").split()


def test_cpu_intel_sapphire_rapids_amx(table):
    c = {"vendor": "GenuineIntel", "family": 6, "model": 143,
         "model_name": "Intel(R) Xeon(R) Platinum 8480+", "flags": SPR_FLAGS,
         "cores": 8, "max_mhz": 3000.0, "mhz_source": "lscpu max MHz"}
    n = nominal_for(CPU_DEV, cpu=c, table=table)
    assert n["kind"] == "derived" and n["rule"] == "intel-avx512"
    assert n["compute_flops"]["fp32"] == pytest.approx(8 * 3.0e9 * 64)
    assert n["compute_flops"]["fp64"] == pytest.approx(8 * 3.0e9 * 32)
    assert n["compute_flops"]["bf16"] == pytest.approx(8 * 3.0e9 * 1024)  # AMX
    assert n["compute_flops"]["fp16"] == pytest.approx(8 * 3.0e9 * 128)   # AVX512-FP16
    assert n["compute_flops"]["int8"] == pytest.approx(8 * 3.0e9 * 2048)  # AMX-INT8
    assert "AMX-BF16" in n["notes"]


def test_cpu_intel_avx512_bf16_without_amx(table):
    flags = [f for f in SPR_FLAGS if not f.startswith("amx") and f != "avx512_fp16"]
    c = {"vendor": "GenuineIntel", "family": 6, "model": 85, "flags": flags, "cores": 4,
         "max_mhz": 2000.0, "mhz_source": "test"}
    n = nominal_for(CPU_DEV, cpu=c, table=table)
    assert n["compute_flops"]["bf16"] == pytest.approx(4 * 2.0e9 * 128)
    assert "fp16" not in n["compute_flops"]


def test_cpu_intel_avx2_only(table):
    c = {"vendor": "GenuineIntel", "family": 6, "model": 63, "model_name": "Xeon E5-2690 v3",
         "flags": "sse sse2 avx fma avx2".split(), "cores": 4, "max_mhz": 2500.0,
         "mhz_source": "test"}
    n = nominal_for(CPU_DEV, cpu=c, table=table)
    assert n["rule"] == "intel-avx2-fma"
    assert n["compute_flops"] == {"fp64": pytest.approx(4 * 2.5e9 * 16),
                                  "fp32": pytest.approx(4 * 2.5e9 * 32)}


def test_cpu_zen5_full_width(table):
    n = nominal_for(CPU_DEV, cpu=cpu_desc(family=26, model=2, model_name="AMD EPYC 9575F"),
                    table=table)
    assert n["rule"] == "amd-zen5"
    assert n["compute_flops"]["fp32"] == pytest.approx(2 * 2.596e9 * 64)
    assert n["compute_flops"]["bf16"] == pytest.approx(2 * 2.596e9 * 128)


def test_cpu_arm64_neon(table):
    c = {"vendor": "ARM", "arch": "aarch64", "model": 0xD0C, "model_name": "Neoverse-N1",
         "flags": "fp asimd evtstrm aes pmull crc32 atomics fphp asimdhp asimddp".split(),
         "cores": 4, "max_mhz": 3000.0, "mhz_source": "test"}
    n = nominal_for(CPU_DEV, cpu=c, table=table)
    assert n["rule"] == "arm-neon"
    assert n["compute_flops"]["fp32"] == pytest.approx(4 * 3.0e9 * 16)
    assert n["compute_flops"]["fp64"] == pytest.approx(4 * 3.0e9 * 8)
    assert n["compute_flops"]["fp16"] == pytest.approx(4 * 3.0e9 * 32)
    assert "bf16" not in n["compute_flops"]


def test_cpu_arm64_sve_scales_with_vector_length(table):
    c = {"vendor": "ARM", "model": 0xD40, "flags": "fp asimd asimdhp asimddp sve bf16".split(),
         "cores": 2, "max_mhz": 2600.0, "mhz_source": "test", "sve_vector_bits": 256}
    n = nominal_for(CPU_DEV, cpu=c, table=table)  # Graviton3 / Neoverse V1
    assert n["rule"] == "arm-sve"
    assert n["compute_flops"]["fp32"] == pytest.approx(2 * 2.6e9 * 32)
    c.pop("sve_vector_bits")
    n = nominal_for(CPU_DEV, cpu=c, table=table)
    assert n["compute_flops"]["fp32"] == pytest.approx(2 * 2.6e9 * 16)
    assert "128 bits assumed" in n["notes"]


def test_cpu_arm64_grace(table):
    c = {"vendor": "ARM", "model": "0xd4f", "flags": "fp asimd asimdhp asimddp sve sve2".split(),
         "cores": 72, "max_mhz": 3100.0, "mhz_source": "test"}
    n = nominal_for(CPU_DEV, cpu=c, table=table)
    assert n["rule"] == "arm-neoverse-v2"
    assert n["compute_flops"]["fp32"] == pytest.approx(72 * 3.1e9 * 32)


def test_cpu_smt_siblings_are_folded(table):
    n = nominal_for(CPU_DEV, cpu=cpu_desc(cores=8, threads_per_core=2), table=table)
    assert n["compute_flops"]["fp32"] == pytest.approx(4 * 2.596e9 * 32)
    assert "4 cores" in n["notes"]


def test_cpu_generic_fallback_and_unknowns(table):
    n = nominal_for(CPU_DEV, cpu={"vendor": "Weird", "flags": ["sse2", "avx", "fma", "avx2"],
                                  "cores": 1, "max_mhz": 1000.0}, table=table)
    assert n["kind"] == "derived" and n["rule"] == "generic-avx2-fma"
    assert n["compute_flops"]["fp32"] == pytest.approx(1e9 * 32)
    no_clock = nominal_for(CPU_DEV, cpu=cpu_desc(max_mhz=None), table=table)
    assert no_clock["kind"] == "unknown" and no_clock["compute_flops"] == {}
    assert "clock" in no_clock["notes"]
    assert nominal_for(CPU_DEV, cpu=None, table=table)["kind"] == "unknown"
    none = nominal_for(CPU_DEV, cpu={"vendor": "X", "flags": [], "cores": 1, "max_mhz": 1.0},
                       table=table)
    assert none["kind"] == "unknown" and "no CPU rule" in none["notes"]


# ------------------------------------------------------------------------------ overrides

def test_overrides_replace_fields(table):
    d = dev("NVIDIA H100 80GB HBM3")
    n = nominal_for(d, overrides={"cuda:0": {"memory_Bps": 2.0e12}}, table=table)
    assert n["kind"] == "override" and n["base_kind"] == "datasheet"
    assert n["memory_Bps"] == 2.0e12
    assert n["compute_flops"]["bf16"] == pytest.approx(989.4e12)  # untouched
    assert n["overridden"] == ["memory_Bps"]
    assert "memory_Bps" in n["notes"]
    # id beats type; compute merged per dtype; other devices untouched.
    ov = {"cuda": {"memory_Bps": 1.0e12, "compute_flops": {"bf16": 5e14}},
          "cuda:0": {"memory_Bps": 3.0e12}}
    n = nominal_for(d, overrides=ov, table=table)
    assert n["memory_Bps"] == 3.0e12
    assert n["compute_flops"]["bf16"] == 5e14
    assert n["compute_flops"]["fp8"] == pytest.approx(1978.9e12)
    assert set(n["overridden"]) == {"memory_Bps", "compute_flops.bf16"}
    other = nominal_for(dev("NVIDIA H100 80GB HBM3", id_="cuda:1"),
                        overrides={"cuda:0": {"memory_Bps": 1.0}}, table=table)
    assert other["kind"] == "datasheet"
    # CPU memory bandwidth by type key; an unknown device gets overridden fields only.
    c = nominal_for(CPU_DEV, cpu=cpu_desc(), overrides={"cpu": {"memory_Bps": 4.0e10}},
                    table=table)
    assert c["memory_Bps"] == 4.0e10 and c["kind"] == "override"
    assert c["compute_flops"]["fp32"] == pytest.approx(2 * 2.596e9 * 32)
    u = nominal_for(dev("NVIDIA Foo"), overrides={"cuda:0": {"bf16": 1e14}}, table=table)
    assert u["kind"] == "override" and u["compute_flops"] == {"bf16": 1e14}


def test_bad_overrides_raise(table):
    d = dev("NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="cuda:0.memory_bps"):
        nominal_for(d, overrides={"cuda:0": {"memory_bps": 1.0}}, table=table)
    with pytest.raises(ValueError, match="memory_Bps"):
        nominal_for(d, overrides={"cuda:0": {"memory_Bps": -1}}, table=table)
    with pytest.raises(UserError):
        nominal_for(d, overrides={"cuda:0": {"compute_flops": {"fp4": 1.0}}}, table=table)


# ------------------------------------------------------------------------------ roofline

NOM = {"compute_flops": {"bf16": 100.0}, "memory_Bps": 10.0, "link_Bps": 4.0,
       "host_link_Bps": 2.0}


def test_ridge(table):
    h100 = nominal_for(dev("NVIDIA H100 80GB HBM3"), table=table)
    assert ridge(h100, "bf16") == pytest.approx(989.4e12 / 3.35e12)
    assert ridge(NOM, "bf16") == 10.0
    assert ridge(NOM, "fp8") is None
    assert ridge(NOM, None) is None
    assert ridge({"compute_flops": {"bf16": 1.0}, "memory_Bps": None}, "bf16") is None


def test_bound_for():
    assert bound_for(0, 0, NOM, "bf16", None) == "latency"
    assert bound_for(0, 100, NOM, "bf16", "compute") == "memory"
    assert bound_for(1000, 100, NOM, "bf16", None) == "compute"   # intensity 10 = ridge
    assert bound_for(1000, 101, NOM, "bf16", None) == "memory"
    assert bound_for(1000, 0, NOM, "bf16", None) == "compute"
    # ridge unknown: hint, else compute
    assert bound_for(1000, 100, NOM, "fp8", "memory") == "memory"
    assert bound_for(1000, 100, NOM, "fp8", None) == "compute"
    assert bound_for(1000, 100, {}, None, None) == "compute"
    # a transfer probe declares its link
    assert bound_for(0, 100, NOM, None, "link") == "link"


def test_roofline_fraction():
    assert roofline_fraction("compute", 50.0, None, NOM, "bf16") == 0.5
    assert roofline_fraction("memory", None, 5.0, NOM, "bf16") == 0.5
    assert roofline_fraction("link", None, 2.0, NOM, None) == 0.5
    assert roofline_fraction("memory", None, 2.0, NOM, None, link=True) == 0.5
    assert roofline_fraction("memory", None, 1.0, NOM, None, link="host") == 0.5
    assert roofline_fraction("compute", 50.0, None, NOM, "fp8") is None
    assert roofline_fraction("compute", None, None, NOM, "bf16") is None
    assert roofline_fraction("latency", 1.0, 1.0, NOM, "bf16") is None
    assert roofline_fraction("memory", None, 5.0, {"memory_Bps": None}, None) is None
    assert roofline_fraction("link", None, 5.0, {"link_Bps": None}, None) is None


# ------------------------------------------------------------------------------ broken tables

GOOD_ROW = """
  - name: Foo X1
    match: ['foo x1']
    source: "Foo datasheet 2026"
    compute: {bf16: 1.5e14, fp32: 2e13}
    memory_Bps: 1e12
"""


def write(tmp_path, body, name="acc.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_small_table_loads_and_exponents_are_floats(tmp_path):
    t = load_table(write(tmp_path, "accelerators:" + GOOD_ROW))
    row = t["accelerators"][0]
    assert row["compute"] == {"bf16": 1.5e14, "fp32": 2e13}
    assert row["memory_Bps"] == 1e12 and row["link_Bps"] is None
    n = nominal_for(dev("Foo X1"), table=t)
    assert n["row"] == "Foo X1" and n["compute_flops"]["bf16"] == 1.5e14


def test_missing_source_raises_naming_the_row(tmp_path):
    body = "accelerators:" + GOOD_ROW + """
  - name: Bar Y2
    match: ['bar']
    compute: {bf16: 1e14}
    memory_Bps: 1e12
"""
    with pytest.raises(ValueError, match=r"row 'Bar Y2'.*'source'"):
        load_table(write(tmp_path, body))


@pytest.mark.parametrize("mutation,expect", [
    (("compute: {bf16: 1.5e14, fp32: 2e13}", "compute: {bf17: 1.0}"), r"Foo X1.*compute\.bf17"),
    (("memory_Bps: 1e12", "memory_Bps: -5"), r"Foo X1.*memory_Bps"),
    (("memory_Bps: 1e12", "memory_Bps: fast"), r"Foo X1.*memory_Bps"),
    (("match: ['foo x1']", "match: ['foo (']"), r"Foo X1.*match"),
    (("    memory_Bps: 1e12", "    memory_Bps: 1e12\n    memroy: 1"), r"Foo X1.*memroy"),
    (("    memory_Bps: 1e12\n", ""), r"Foo X1.*memory_Bps"),
])
def test_broken_rows_raise(tmp_path, mutation, expect):
    body = "accelerators:" + GOOD_ROW.replace(*mutation)
    with pytest.raises(ValueError, match=expect):
        load_table(write(tmp_path, body))


def test_shadowed_example_raises(tmp_path):
    body = """
accelerators:
  - name: Catch-all
    match: ['h100']
    source: s
    compute: {bf16: 1e14}
    memory_Bps: 1e12
  - name: Specific
    match: ['h100 nvl']
    examples: ["NVIDIA H100 NVL"]
    source: s
    compute: {bf16: 1e14}
    memory_Bps: 1e12
"""
    with pytest.raises(ValueError, match=r"Specific.*resolves to 'Catch-all'"):
        load_table(write(tmp_path, body))


def test_bad_cpu_rule_and_unreadable_file(tmp_path):
    body = "accelerators:" + GOOD_ROW + """
cpu:
  rules:
    - name: r1
      label: l
      when: {vendr: GenuineIntel}
      dtypes: {fp32: 32}
      source: s
"""
    with pytest.raises(ValueError, match=r"cpu rule 'r1'.*vendr"):
        load_table(write(tmp_path, body))
    with pytest.raises(ValueError, match="cannot read"):
        load_table(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_table(write(tmp_path, "accelerators: [\n", name="bad.yaml"))


# ------------------------------------------------------------------------------ CPU: rules on real flags

def intel(model, name, flags, cores=4, mhz=3000.0):
    return {"vendor": "GenuineIntel", "family": 6, "model": model, "model_name": name,
            "flags": flags.split() if isinstance(flags, str) else flags, "cores": cores,
            "max_mhz": mhz, "mhz_source": "test"}


SKX_FLAGS = "sse2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl"


@pytest.mark.parametrize("name,flags,rule,fp32", [
    # ARK "# of AVX-512 FMA Units": Bronze/Silver/Gold 5xxx one, Gold 5122/5222 and 6xxx/Platinum two.
    ("Intel(R) Xeon(R) Gold 5118 CPU @ 2.30GHz", SKX_FLAGS, "intel-avx512-1fma", 32),
    ("Intel(R) Xeon(R) Silver 4114 CPU @ 2.20GHz", SKX_FLAGS, "intel-avx512-1fma", 32),
    ("Intel(R) Xeon(R) Bronze 3104 CPU @ 1.70GHz", SKX_FLAGS, "intel-avx512-1fma", 32),
    ("Intel(R) Xeon(R) Gold 5218 CPU @ 2.30GHz", SKX_FLAGS + " avx512_vnni", "intel-avx512-1fma", 32),
    ("Intel(R) Xeon(R) Gold 5122 CPU @ 3.60GHz", SKX_FLAGS, "intel-avx512", 64),
    ("Intel(R) Xeon(R) Gold 5222 CPU @ 3.80GHz", SKX_FLAGS + " avx512_vnni", "intel-avx512", 64),
    ("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", SKX_FLAGS, "intel-avx512", 64),
    ("Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz", SKX_FLAGS, "intel-avx512", 64),
    # Cooper Lake shares model 85 but has two FMA units on every SKU.
    ("Intel(R) Xeon(R) Gold 5318H CPU @ 2.50GHz", SKX_FLAGS + " avx512_vnni avx512_bf16", "intel-avx512", 64),
])
def test_cpu_intel_one_fma_unit_parts_are_told_apart(table, name, flags, rule, fp32):
    n = nominal_for(CPU_DEV, cpu=intel(85, name, flags), table=table)
    assert n["rule"] == rule
    assert n["compute_flops"]["fp32"] == pytest.approx(4 * 3.0e9 * fp32)
    assert n["compute_flops"]["fp64"] == pytest.approx(4 * 3.0e9 * fp32 / 2)
    assert n["vector_bits"] == 512
    if "avx512_vnni" in flags:
        assert n["flop_per_cycle"]["int8"] == (128 if fp32 == 32 else 256)


def test_cpu_icelake_sp_silver_has_two_fma_units(table):
    # Ice Lake-SP (model 106): two FMA units on all SKUs, Silver included.
    n = nominal_for(CPU_DEV, cpu=intel(106, "Intel(R) Xeon(R) Silver 4314 CPU @ 2.40GHz",
                                       SKX_FLAGS + " avx512_vnni"), table=table)
    assert n["rule"] == "intel-avx512" and n["flop_per_cycle"]["fp32"] == 64


def test_cpu_intel_client_avx512_has_one_fma_unit(table):
    n = nominal_for(CPU_DEV, cpu=intel(0x8c, "11th Gen Intel(R) Core(TM) i7-1185G7", SKX_FLAGS), table=table)
    assert n["rule"] == "intel-avx512-client" and n["flop_per_cycle"]["fp32"] == 32


GNR_FLAGS = SPR_FLAGS + ["avx_vnni"]


@pytest.mark.parametrize("model,extra,fp16", [
    (173, [], 1024),            # Granite Rapids, kernel that does not print amx_fp16 (RHEL 9)
    (173, ["amx_fp16"], 1024),  # newer kernel prints it
    (174, [], 1024),            # Granite Rapids-D
    (143, [], 128),             # Sapphire Rapids: no AMX-FP16, AVX512-FP16 only
    (143, ["amx_fp16"], 1024),  # the flag alone is enough
])
def test_cpu_amx_fp16_by_flag_or_granite_rapids_model(table, model, extra, fp16):
    n = nominal_for(CPU_DEV, cpu=intel(model, "Intel(R) Xeon(R) 6972P", SPR_FLAGS + extra, cores=8,
                                       mhz=3900.0), table=table)
    assert n["flop_per_cycle"]["fp16"] == fp16
    assert n["flop_per_cycle"]["bf16"] == 1024
    assert n["compute_flops"]["fp16"] == pytest.approx(8 * 3.9e9 * fp16)


def test_cpu_granite_rapids_without_amx_tiles_gets_no_amx(table):
    # A VM that hides AMX (no amx_tile: the tile state is not enabled) must not get AMX figures.
    flags = [f for f in SPR_FLAGS if not f.startswith("amx")]
    n = nominal_for(CPU_DEV, cpu=intel(173, "Intel(R) Xeon(R) 6972P", flags), table=table)
    assert n["flop_per_cycle"]["fp16"] == 128 and n["flop_per_cycle"]["bf16"] == 128


def test_cpu_alternative_models_key_is_validated(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(textwrap.dedent("""
        accelerators:
          - {name: X, match: X, source: s, compute: {fp32: 1}, memory_Bps: 1}
        cpu:
          rules:
            - {name: r, label: l, when: {}, source: s,
               dtypes: {fp32: [{flop_per_cycle: 2, models: [nope]}]}}
    """))
    with pytest.raises(UserError, match="models"):
        load_table(p)


# ------------------------------------------------------------------------------ CPU: from the environment document

import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from harness import cpuclock, environment  # noqa: E402
from harness.nominal import cpu_description, cpu_nominal  # noqa: E402

MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"
CPU_SNAPSHOTS = sorted(p.name for p in MACHINES.glob("cpu-*") if (p / "expected.yaml").exists())


@pytest.fixture
def no_measuring(monkeypatch):
    """Fail the test if anything measures the clock (a captured machine must not)."""
    def boom(*a, **k):
        raise AssertionError("clock measured on a non-live root")
    monkeypatch.setattr(cpuclock, "measure_clock_hz", boom)


def snapshot_doc(name):
    return environment.collect(root=str(MACHINES / name), env={}, live=False, import_frameworks=False)


def test_cpu_snapshot_corpus_is_complete():
    # Zen 2/3/4; Skylake-SP Gold 5xxx, Ice Lake-SP, Sapphire and Granite Rapids; N1, V1, V2 (two).
    assert len(CPU_SNAPSHOTS) >= 11
    rules = {yaml.safe_load((MACHINES / n / "expected.yaml").read_text())["nominal"]["cpu"]["rule"]
             for n in CPU_SNAPSHOTS}
    assert {"amd-zen2", "amd-zen3", "amd-zen4", "intel-avx512-1fma", "intel-avx512", "arm-neon",
            "arm-sve", "arm-neoverse-v2"} <= rules


@pytest.mark.parametrize("name", CPU_SNAPSHOTS)
def test_cpu_snapshot_matches_expected(name, no_measuring):
    exp = yaml.safe_load((MACHINES / name / "expected.yaml").read_text())
    doc = snapshot_doc(name)
    for key, want in (exp.get("cpu") or {}).items():
        assert doc["cpu"][key]["value"] == want, (key, doc["cpu"][key])
    n = cpu_nominal(doc, live=False)
    want = exp["nominal"]["cpu"]
    assert n["rule"] == want["rule"]
    assert n["cores"] == want["cores"]
    if want["clock_hz"] is None:
        assert n["clock_hz"] is None and n["compute_flops"] == {} and n["kind"] == "unknown"
        assert "clock unknown" in n["clock_source"]
    else:
        assert n["clock_hz"] == pytest.approx(want["clock_hz"], rel=1e-6)
        assert n["kind"] == "derived"
    for d, v in want["flop_per_cycle"].items():
        assert n["flop_per_cycle"][d] == pytest.approx(v), d
    for d, v in want["compute_flops"].items():
        assert n["compute_flops"][d] == pytest.approx(v, rel=1e-6), d
        assert v == pytest.approx(n["cores"] * n["clock_hz"] * n["flop_per_cycle"][d], rel=1e-6)
    assert n["source"] and n["vector_bits"]


def test_cpu_arm_rules_see_the_features_line(no_measuring):
    # Field case arm-nominal: the rules match the kernel's Features names (asimd, sve, ...).
    g2 = snapshot_doc("cpu-arm-graviton2-n1")
    assert {"asimd", "asimdhp", "asimddp"} <= set(g2["cpu"]["flags"]["value"])
    assert cpu_nominal(g2, live=False)["flop_per_cycle"]["fp64"] == 8
    g3 = snapshot_doc("cpu-arm-graviton3-v1")
    assert g3["cpu"]["sve_vector_bits"]["value"] == 256
    n3 = cpu_nominal(g3, live=False)
    assert (n3["rule"], n3["flop_per_cycle"]["fp64"], n3["vector_bits"]) == ("arm-sve", 16, 256)
    grace = cpu_nominal(snapshot_doc("cpu-arm-grace-v2"), live=False)
    assert (grace["rule"], grace["flop_per_cycle"]["fp64"]) == ("arm-neoverse-v2", 16)


def test_sve_vector_length_is_read_from_the_machine(tmp_path):
    from harness.virtualization import HostView

    def vl(text, flags=("asimd", "sve")):
        root = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        if text is not None:
            p = root / "proc/sys/abi/sve_default_vector_length"
            p.parent.mkdir(parents=True)
            p.write_text(text)
        root.mkdir(exist_ok=True)
        return environment._sve_vector_bits(HostView(str(root), {}), list(flags))

    assert vl("64\n")["value"] == 512
    assert "default" in vl("16\n")["source"]
    assert vl("24\n")["value"] is None          # not a multiple of 128 bits
    assert vl("junk\n")["value"] is None
    assert vl(None)["value"] is None and "unknown" in vl(None)["source"]
    assert vl("32\n", flags=("asimd",))["value"] is None  # no SVE: no length


def test_cores_are_physical_cores_of_the_affinity_set_capped_by_quota(no_measuring):
    doc = snapshot_doc("cpu-amd-zen3-epyc7763")  # 8 cores x SMT2, pinned to 0-3,8-11
    assert doc["cpu"]["usable_cores"]["value"] == 8
    assert doc["cpu"]["usable_physical_cores"]["value"] == 4
    assert cpu_nominal(doc, live=False)["cores"] == 4
    # A CPU quota below the cores caps them, fractional quotas included.
    doc["cpu"]["cgroup_cpu_limit_cores"] = {"value": 2.5, "source": "test cpu.max"}
    n = cpu_nominal(doc, live=False)
    assert n["cores"] == 2.5
    assert n["compute_flops"]["fp32"] == pytest.approx(2.5 * 3.525e9 * 32)
    assert "cgroup CPU quota 2.5" in n["cores_source"]
    doc["cpu"]["cgroup_cpu_limit_cores"] = {"value": 64, "source": "test cpu.max"}
    assert cpu_nominal(doc, live=False)["cores"] == 4  # a quota above the cores changes nothing


def test_cpufreq_max_wins_over_the_clock_cache(no_measuring, tmp_path):
    import shutil
    root = tmp_path / "m"
    shutil.copytree(MACHINES / "cpu-amd-zen3-epyc7763", root)
    bid = (root / "proc/sys/kernel/random/boot_id").read_text().strip()
    cache = root / cpuclock.CLOCK_CACHE
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"clock_hz": 2.0e9, "boot_id": bid}))
    doc = environment.collect(root=str(root), env={}, live=False, import_frameworks=False)
    n = cpu_nominal(doc, live=False)
    assert n["clock_hz"] == pytest.approx(3.525e9) and "cpuinfo_max_freq" in n["clock_source"]


def test_old_environment_documents_still_derive(no_measuring):
    # Documents written before the raw flags / physical-core facts existed.
    old = {"cpu": {"vendor": {"value": "AuthenticAMD", "source": ""}, "family": {"value": 25, "source": ""},
                   "model": {"value": 17, "source": ""}, "model_name": {"value": "AMD EPYC", "source": ""},
                   "logical_cores": {"value": 4, "source": ""}, "physical_cores": {"value": 2, "source": ""},
                   "usable_cores": {"value": 4, "source": ""},
                   "isa": {"value": {"avx2": True, "fma": True, "avx512f": True, "avx512_bf16": True}, "source": ""},
                   "frequency": {"max_mhz": {"value": 3000.0, "source": "cpufreq"}}}}
    n = cpu_nominal(old, live=False)
    assert n["rule"] == "amd-zen4" and n["cores"] == 2
    assert n["compute_flops"]["bf16"] == pytest.approx(2 * 3e9 * 64)
    assert cpu_nominal({}, live=False)["kind"] == "unknown"


def test_runner_judges_against_cpu_nominal(no_measuring):
    from harness.runner import device_nominal_table
    doc = snapshot_doc("cpu-intel-sapphire-rapids-8488c")
    dev_ = {"id": "cpu:0", "type": "cpu", "name": "cpu"}
    table_ = device_nominal_table([dev_], doc, {}, live=False)
    assert table_["cpu:0"]["compute_flops"] == cpu_nominal(doc, live=False)["compute_flops"]
    over = device_nominal_table([dev_], doc, {"cpu": {"fp32": 1e12}}, live=False)["cpu:0"]
    assert over["compute_flops"]["fp32"] == 1e12 and over["kind"] == "override"


# ------------------------------------------------------------------------------ CPU clock: per boot

@pytest.fixture
def fake_boot(tmp_path):
    root = tmp_path / "root"
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-one\n")
    return root


def test_clock_is_kept_per_boot_and_never_remeasured(fake_boot, monkeypatch):
    readings = iter([(3.1e9, "measured: first"), (2.2e9, "measured: under load")])
    calls = []

    def fake_measure():
        calls.append(1)
        return next(readings)
    monkeypatch.setattr(cpuclock, "measure_clock_hz", fake_measure)
    hz, how = cpuclock.clock_hz(str(fake_boot), live=True)
    assert hz == 3.1e9 and "kept per boot" in how
    again, _ = cpuclock.clock_hz(str(fake_boot), live=True)   # a later run, maybe loaded
    assert again == 3.1e9 and len(calls) == 1
    kept = json.loads((fake_boot / cpuclock.CLOCK_CACHE).read_text())
    assert kept["boot_id"] == "boot-one" and kept["clock_hz"] == 3.1e9
    # A new boot: the old figure is stale, measured again and replaced.
    (fake_boot / cpuclock.BOOT_ID_PATH).write_text("boot-two\n")
    assert cpuclock.read_cached_clock(str(fake_boot))[0] is None
    hz2, _ = cpuclock.clock_hz(str(fake_boot), live=True)
    assert hz2 == 2.2e9 and len(calls) == 2
    assert json.loads((fake_boot / cpuclock.CLOCK_CACHE).read_text())["boot_id"] == "boot-two"


def test_first_writer_of_a_boot_wins(fake_boot):
    path = cpuclock.cache_path(str(fake_boot))
    cpuclock._write_cache(path, 3.0e9, "a", "boot-one")
    cpuclock._write_cache(path, 2.0e9, "b", "boot-one")  # a concurrent second run
    assert cpuclock.read_cached_clock(str(fake_boot))[0] == 3.0e9
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]


def test_captured_machine_never_measures(fake_boot, no_measuring):
    hz, why = cpuclock.clock_hz(str(fake_boot), live=False)
    assert hz is None and "not measured" in why
    (fake_boot / cpuclock.CLOCK_CACHE).parent.mkdir(parents=True)
    (fake_boot / cpuclock.CLOCK_CACHE).write_text(json.dumps({"clock_hz": 2.9e9, "boot_id": "boot-one"}))
    assert cpuclock.clock_hz(str(fake_boot), live=False)[0] == 2.9e9


@pytest.mark.parametrize("content", ["{", "[]", '{"clock_hz": 5}', '{"clock_hz": true}', '{"clock_hz": "3e9"}'])
def test_bad_clock_cache_is_unknown_not_an_error(fake_boot, content):
    (fake_boot / cpuclock.CLOCK_CACHE).parent.mkdir(parents=True)
    (fake_boot / cpuclock.CLOCK_CACHE).write_text(content)
    hz, why = cpuclock.read_cached_clock(str(fake_boot))
    assert hz is None and cpuclock.CLOCK_CACHE in why


def test_state_dir_redirects_the_live_cache(tmp_path):
    env_ = {cpuclock.STATE_DIR_ENV: str(tmp_path)}
    assert cpuclock.cache_path("/", env_) == str(tmp_path / "cpu-clock.json")
    assert cpuclock.cache_path(str(tmp_path / "snap"), env_) == str(tmp_path / "snap" / cpuclock.CLOCK_CACHE)


def test_clock_measurement_on_this_host_is_a_clock_or_a_reason():
    hz, how = cpuclock.measure_clock_hz()
    if hz is None:  # unsupported architecture or W^X policy: a reason, never a guess
        assert how
    else:
        assert 1e8 < hz < 1e10 and "dependent" in how


def test_aarch64_add_chain_branches_back_to_the_first_add():
    # b.ne's imm19 (bits 5..23, in instructions, signed) must land on the first add.
    words = cpuclock._A64_WORDS
    bne = words.index(next(w for w in words if w >> 24 == 0x54))
    imm19 = (words[bne] >> 5) & 0x7FFFF
    offset = imm19 - (1 << 19) if imm19 & (1 << 18) else imm19
    assert words[bne + offset] == 0x91000400 and words[bne + offset - 1] == 0xD2800000
    assert words.count(0x91000400) == cpuclock.ADDS_PER_ITERATION


def _aarch64_elf(code: bytes) -> bytes:
    """A minimal static AArch64 Linux ELF (one PT_LOAD R+X segment) whose entry runs ``code``."""
    import struct
    base, hdr = 0x400000, 64 + 56
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 183, 1, base + hdr, 64, 0, 0, 64, 56, 1, 0, 0, 0))
    total = hdr + len(code)
    return ehdr + struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000) + code


@pytest.mark.parametrize("n", [1, 3, 10])
def test_aarch64_add_chain_runs_under_qemu(tmp_path, n):
    """The AArch64 clock code adds 8 per iteration and returns: run it as a tiny static
    program (mov x0, #n; bl chain; exit(x0)) under qemu-user where that is installed."""
    import shutil
    import struct
    import subprocess
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not qemu:
        pytest.skip("qemu-aarch64 not installed (optional check of the AArch64 machine code)")
    start = [0xD2800000 | (n << 5),  # movz x0, #n
             0x94000003,             # bl chain (3 instructions on)
             0xD2800BA8,             # movz x8, #93 (exit)
             0xD4000001]             # svc #0
    prog = tmp_path / "chain"
    prog.write_bytes(_aarch64_elf(b"".join(struct.pack("<I", w) for w in start) + cpuclock._AARCH64_CODE))
    prog.chmod(0o755)
    r = subprocess.run([qemu, str(prog)], timeout=30, capture_output=True)
    assert r.returncode == n * cpuclock.ADDS_PER_ITERATION


def test_affinity_mask_with_offline_cpus_and_garbage(tmp_path, no_measuring):
    import shutil
    root = tmp_path / "m"
    shutil.copytree(MACHINES / "cpu-amd-zen3-epyc7763", root)
    status = root / "proc/self/status"
    # Possible-but-offline CPUs in the raw mask (16 online): they are not usable cores.
    status.write_text("Name:\tx\nCpus_allowed_list:\t0-3,8-11,16-255\n")
    doc = environment.collect(root=str(root), env={}, live=False, import_frameworks=False)
    assert doc["cpu"]["usable_cores"]["value"] == 8
    assert doc["cpu"]["usable_physical_cores"]["value"] == 4
    for junk in ("zz-top", "0-99999999", "3-"):
        status.write_text(f"Name:\tx\nCpus_allowed_list:\t{junk}\n")
        doc = environment.collect(root=str(root), env={}, live=False, import_frameworks=False)
        assert doc["cpu"]["physical_cores"]["value"] == 8      # the rest of the topology survives
        assert doc["cpu"]["usable_physical_cores"]["value"] is None
        assert cpu_nominal(doc, live=False)["cores"] == 8       # all physical cores, said so
