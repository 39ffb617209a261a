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
