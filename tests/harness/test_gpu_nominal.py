"""GPU nominals: MIG slices, pair links from NVML, per-direction link figures, TF32, staged copies."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import nominal
from harness.environment import nvidia_info
from harness.nvml_record import RecordedNvml, load_record
from harness.errors import UserError

MACHINES = Path(__file__).resolve().parents[1] / "fixtures" / "machines"
TABLE = nominal.load_table()
H100 = next(r for r in TABLE["accelerators"] if r["name"] == "NVIDIA H100 SXM5 80GB")


def gpu(i, name, **kw):
    return {"id": f"cuda:{i}", "type": "cuda", "name": name, **kw}


# -- MIG ---------------------------------------------------------------------------------
def test_mig_slice_scaled_by_its_sms_and_memory_slices():
    n = nominal.nominal_for(gpu(0, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", extra={"multiprocessors": 16}), table=TABLE)
    assert n["kind"] == "derived" and n["row"] == H100["name"]
    assert n["compute_flops"]["bf16"] == pytest.approx(H100["compute"]["bf16"] * 16 / 132)
    assert n["memory_Bps"] == pytest.approx(H100["memory_Bps"] / 8)
    assert n["link_Bps"] is None and "16/132 SMs" in n["notes"]


def test_mig_slice_without_sm_count_uses_gpc_slices():
    n = nominal.nominal_for(gpu(0, "NVIDIA A100-SXM4-40GB MIG 3g.20gb"), table=TABLE)
    a100 = next(r for r in TABLE["accelerators"] if r["name"] == "NVIDIA A100 SXM4 40GB")
    assert n["compute_flops"]["fp16"] == pytest.approx(a100["compute"]["fp16"] * 3 / 7)
    assert n["memory_Bps"] == pytest.approx(a100["memory_Bps"] * 4 / 8)  # 20 of 40 GB = 4 slices


def test_mig_profile_not_understood_is_unknown_not_the_whole_gpu():
    n = nominal.nominal_for(gpu(0, "NVIDIA H100 80GB HBM3 MIG"), table=TABLE)
    assert n["kind"] == "unknown" and n["compute_flops"] == {} and n["memory_Bps"] is None
    assert "MIG" in n["notes"]


def test_whole_gpu_keeps_its_row():
    n = nominal.nominal_for(gpu(0, "NVIDIA H100 80GB HBM3"), table=TABLE)
    assert n["kind"] == "datasheet" and n["compute_flops"]["bf16"] == H100["compute"]["bf16"]


# -- links -----------------------------------------------------------------------------
def snapshot_nvidia(name: str) -> dict:
    return nvidia_info(RecordedNvml(load_record(MACHINES / name / ".coherence" / "nvml.json")))


def test_nvml_pair_facts_count_only_links_that_join_the_pair():
    info = snapshot_nvidia("gpu-a100-pcie-partial-nvlink")
    pairs = {tuple(p["gpus"]): p["nvlink_links"]["value"] for p in info["links"]["pairs"]}
    assert pairs[(0, 1)] == 12 and pairs[(2, 3)] == 0 and pairs[(0, 2)] == 0


def test_bridge_on_some_pairs_only():
    """A100 PCIe: the bridge the datasheet offers is fitted between cards 0 and 1 only;
    every other pair is judged on PCIe (the x8 card at half of gen4 x16)."""
    doc = {"nvidia": snapshot_nvidia("gpu-a100-pcie-partial-nvlink")}
    noms = nominal.gpu_nominals(doc, TABLE)
    assert nominal.peer_link(noms["cuda:0"], "cuda:1")["link_Bps"] == 12 * 25e9
    assert nominal.peer_link(noms["cuda:2"], "cuda:3") == {**nominal.peer_link(noms["cuda:2"], "cuda:3"),
                                                           "link_Bps": 16e9, "via": "pcie"}
    assert nominal.peer_link(noms["cuda:0"], "cuda:2")["link_Bps"] == 32e9
    # a ring over 0-1 only uses the bridge; over all four the slowest hop decides
    assert nominal.group_link_Bps(noms["cuda:0"], ["cuda:0", "cuda:1"]) == 300e9
    assert nominal.group_link_Bps(noms["cuda:0"], ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]) == 16e9
    # the judgement of a peer copy uses the pair's link
    assert nominal.roofline_fraction("link", None, 150e9, noms["cuda:0"], None, link="cuda:1") == pytest.approx(0.5)
    assert nominal.roofline_fraction("link", None, 16e9, noms["cuda:0"], None, link="cuda:2") == pytest.approx(0.5)


def test_without_nvml_a_bridge_card_has_no_link_figure():
    noms = {d: nominal.nominal_for(gpu(i, "NVIDIA A100-PCIE-40GB"), table=TABLE) for i, d in enumerate(["cuda:0", "cuda:1"])}
    nominal.attach_gpu_links(noms, {"available": False}, TABLE)
    assert noms["cuda:0"]["link_Bps"] is None
    assert nominal.peer_link(noms["cuda:0"], "cuda:1")["link_Bps"] is None


def test_cuda_visible_devices_reordering_maps_pairs_to_the_right_boards():
    doc = {"nvidia": snapshot_nvidia("gpu-a100-cvd-reorder")}
    assert doc["nvidia"]["cuda_map"]["cuda:0"]["nvml_index"] == 2
    noms = nominal.gpu_nominals(doc, TABLE)
    assert set(noms) == {"cuda:0", "cuda:1"}
    assert "NVML GPUs 2 and 0" in nominal.peer_link(noms["cuda:0"], "cuda:1")["source"]


def test_mi300x_point_to_point_uses_one_xgmi_link():
    noms = {f"cuda:{i}": nominal.nominal_for(gpu(i, "AMD Instinct MI300X"), table=TABLE) for i in range(8)}
    nominal.attach_gpu_links(noms, None, TABLE)  # ROCm: no NVML
    assert nominal.peer_link(noms["cuda:0"], "cuda:1")["link_Bps"] == 64e9
    assert nominal.roofline_fraction("link", None, 48e9, noms["cuda:0"], None, link="cuda:1") == pytest.approx(0.75)
    # a collective over all 8 uses the 7 links of each GPU, not one
    assert nominal.group_link_Bps(noms["cuda:0"], [f"cuda:{i}" for i in range(8)]) == 448e9
    assert nominal.group_link_Bps(noms["cuda:0"], ["cuda:0", "cuda:1"]) == 64e9


def test_user_link_override_survives_nvml_links():
    noms = {f"cuda:{i}": nominal.nominal_for(gpu(i, "NVIDIA A100-PCIE-40GB"), table=TABLE,
                                             overrides={"cuda": {"link_Bps": 1e9}}) for i in range(2)}
    nominal.attach_gpu_links(noms, {"available": False}, TABLE)
    assert noms["cuda:0"]["link_Bps"] == 1e9


def test_pcie_rates_per_direction():
    assert nominal.pcie_Bps(4, 16) == 32e9 and nominal.pcie_Bps(5, 16) == 64e9
    assert nominal.pcie_Bps(None, 16) is None and nominal.pcie_Bps(9, 16) is None


# -- the table ---------------------------------------------------------------------------
def test_every_link_figure_says_per_direction():
    for row in TABLE["accelerators"]:
        if any(row.get(k) for k in ("link_Bps", "host_link_Bps", "nvlink_link_Bps", "pair_link_Bps")):
            assert row["link_direction"] == "per_direction", row["name"]


def test_table_refuses_another_link_convention(tmp_path):
    text = nominal.DEFAULT_TABLE_PATH.read_text().replace("    link_direction: per_direction", "    link_direction: bidirectional", 1)
    p = tmp_path / "acc.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match="link_direction"):
        nominal.load_table(p)


# -- TF32 and staged copies --------------------------------------------------------------
def test_fp32_matmul_as_tf32_is_judged_against_tf32():
    n = nominal.nominal_for(gpu(0, "NVIDIA H100 80GB HBM3"), table=TABLE)
    dt, why = nominal.tf32_judgement("cuda:0", "fp32", {"allow_tf32": True, "float32_matmul_precision": "high"}, n)
    assert dt == "tf32" and "TF32" in why
    assert nominal.tf32_judgement("cuda:0", "fp32", {"allow_tf32": False, "float32_matmul_precision": "highest"}, n)[0] is None
    assert nominal.tf32_judgement("cpu:0", "fp32", {"float32_matmul_precision": "high"}, n)[0] is None
    assert nominal.tf32_judgement("cuda:0", "bf16", {"allow_tf32": True}, n)[0] is None


def test_staged_d2d_is_judged_against_the_host_link():
    from probes.transfer import d2d_work

    staged, peer = d2d_work({"size_bytes": 1 << 20}, "host"), d2d_work({"size_bytes": 1 << 20}, "cuda:1")
    assert staged.link == "host" and peer.link == "cuda:1"
    n = nominal.nominal_for(gpu(0, "NVIDIA H100 80GB HBM3"), table=TABLE)
    # 32 GB/s through the host is half of the PCIe gen5 x16 link, not 7 % of NVLink
    assert nominal.roofline_fraction("link", None, 32e9, n, None, link=staged.link) == pytest.approx(0.5)


def test_recorded_nvml_errors_name_the_file(tmp_path):
    bad = tmp_path / "nvml.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="nvml.json"):
        load_record(bad)
    bad.write_text(json.dumps({"gpus": "no"}))
    with pytest.raises(UserError, match="gpus"):
        load_record(bad)


# -- the runner's judgement of a case row ------------------------------------------------
def _row(device, group, work, extra, durations=(0.01,) * 5):
    from harness.registry import PlannedCase
    from harness.runner import case_row

    case = PlannedCase(case_id=f"x@{device}", probe="x", family="x", backend="torch", device=device,
                       params={}, world_size=len(group), group_devices=list(group))
    result = {"status": "ok", "durations_s": list(durations), "work": work, "extra": extra}
    noms = nominal.gpu_nominals({"nvidia": snapshot_nvidia("gpu-a100-pcie-partial-nvlink")}, TABLE)
    return case_row(case, result, noms[group[0]])


def test_case_row_judges_tf32_gemm_against_tf32_and_says_so():
    work = {"flops": 1.56e12, "bytes": 1e6, "bound": None, "dtype": "fp32", "collective": None, "link": None}
    row = _row("cuda:0", ["cuda:0"], work, {"allow_tf32": True, "float32_matmul_precision": "high"})
    assert row["roofline_fraction"] == pytest.approx(1.56e14 / 156e12)  # p50 10 ms
    assert "TF32" in json.loads(row["extra"])["judged_against"]
    row = _row("cuda:0", ["cuda:0"], work, {"allow_tf32": False, "float32_matmul_precision": "highest"})
    assert row["roofline_fraction"] == pytest.approx(1.56e14 / 19.5e12)


def test_case_row_judges_a_collective_by_its_groups_links():
    work = {"flops": 0.0, "bytes": 1e9, "bound": "link", "dtype": None, "link": None,
            "collective": {"op": "all_reduce", "size_bytes": 1e9, "busbw_factor": 1.0}}
    bridged = _row("cuda:0-1", ["cuda:0", "cuda:1"], work, {})
    assert bridged["roofline_fraction"] == pytest.approx(1e11 / 300e9)  # 100 GB/s busbw over the bridge
    pcie = _row("cuda:2-3", ["cuda:2", "cuda:3"], work, {})
    assert pcie["roofline_fraction"] == pytest.approx(1e11 / 16e9)


def test_jax_fp32_dots_below_highest_precision_are_judged_as_tf32():
    n = nominal.nominal_for(gpu(0, "NVIDIA H100 80GB HBM3"), table=TABLE)
    assert nominal.tf32_judgement("jax:gpu:0", "fp32", {"precision": "DEFAULT"}, n)[0] == "tf32"
    assert nominal.tf32_judgement("jax:gpu:0", "fp32", {"precision": "Precision.HIGHEST"}, n)[0] is None
    assert nominal.tf32_judgement("jax:cpu:0", "fp32", {"precision": "DEFAULT"}, n)[0] is None


def test_host_link_is_the_pcie_link_nvml_reports():
    noms = nominal.gpu_nominals({"nvidia": snapshot_nvidia("gpu-a100-pcie-partial-nvlink")}, TABLE)
    assert noms["cuda:0"]["host_link_Bps"] == 32e9  # gen4 x16, as the datasheet
    assert noms["cuda:3"]["host_link_Bps"] == 16e9 and noms["cuda:3"]["host_link_Bps_row"] == 32e9  # x8 slot


def test_mi300x_send_recv_between_two_ranks_is_judged_against_one_pair_link():
    from harness.registry import PlannedCase
    from harness.runner import case_row

    noms = {f"cuda:{i}": nominal.nominal_for(gpu(i, "AMD Instinct MI300X"), table=TABLE) for i in range(8)}
    nominal.attach_gpu_links(noms, None, TABLE)
    assert noms["cuda:0"]["link_Bps"] == 448e9  # a collective over all eight
    case = PlannedCase(case_id="t.kv_sendrecv@cuda:0-1", probe="t", family="transfer", backend="torch",
                       device="cuda:0-1", params={}, world_size=2, group_devices=["cuda:0", "cuda:1"])
    work = {"flops": 0.0, "bytes": 0.32e9, "bound": "link", "dtype": None, "collective": None, "link": None}
    row = case_row(case, {"status": "ok", "durations_s": [0.01] * 5, "work": work, "extra": {}}, noms["cuda:0"])
    assert row["roofline_fraction"] == pytest.approx(32e9 / 64e9)
