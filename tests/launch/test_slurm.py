"""configs/launch/slurm.sbatch and slurm-fleet.sbatch submitted to a real two-node Slurm
(tests/launch/conftest.py): one run folder across both nodes through srun + torchrun,
and a fleet sweep with one run folder per node."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.launch.slurm_cluster import SlurmCluster, SlurmUnavailable, free_port, slurm_conf

LAUNCH = REPO / "configs" / "launch"
SUITES = Path(__file__).resolve().parent / "suites"
JOB_TIMEOUT_S = 240
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


def sbatch(cluster, script: Path, args: list[str], cwd: Path, log: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """``sbatch --nodes=2 FLAGS SCRIPT ARGS`` from ``cwd``; the job's output goes to
    ``log``. COHERENCE_VENV/HOME are dropped so the script finds the project on its own;
    a free port for the rendezvous avoids clashes with other tests."""
    # Nothing from the test's own environment decides GPUs or the project's location.
    base = {k: v for k, v in cluster.env().items()
            if k not in ("COHERENCE_VENV", "COHERENCE_HOME", "COHERENCE_CPU_RANKS", "CUDA_VISIBLE_DEVICES")
            and not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    full_env = {**base, "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "lo", **env}
    return subprocess.run(
        ["sbatch", "--nodes=2", *flags, f"--output={log}", str(script), *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )


def job_id(proc: subprocess.CompletedProcess) -> str:
    m = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return m.group(1)


def run_job(cluster, script: Path, args: list[str], cwd: Path, log: Path, **env: str) -> tuple[str, int]:
    """Submit and wait for the end of the job, polling scontrol every 0.2 s (sbatch
    --wait polls at 2, 10, 42, 74 s: a 12 s job would take 42); (job id, exit code)."""
    proc = sbatch(cluster, script, args, cwd, log, "--parsable", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster.env(), capture_output=True,
                              text=True, timeout=30).stdout
        fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
        if fields.get("JobState") in FINAL_STATES:
            code, signal = (int(x) for x in fields["ExitCode"].split(":"))
            return job, (128 + signal if signal else code)
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=cluster.env(), timeout=30)
    pytest.fail(f"job {job} still running after {JOB_TIMEOUT_S} s: {log.read_text() if log.exists() else ''}")


def test_templates_ask_for_no_gpus_and_read_no_suite_variables():
    """GPUs come from the allocation, suite and folder from the arguments: a Slurm
    without GPUs (like the test one) refuses a job asking for --gpus-per-node."""
    for name in ("slurm.sbatch", "slurm-fleet.sbatch", "torchrun.sh"):
        text = (LAUNCH / name).read_text()
        directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert bool(directives) == name.endswith(".sbatch"), name
        assert not [d for d in directives if re.search(r"gpus|gres", d)], name
        assert not re.search(r"\$\{?(SUITE|OUT)\b", text), name
        assert '"$@"' in text, name


def test_templates_parse_and_torchrun_sh_names_what_is_missing(tmp_path):
    for name in ("slurm.sbatch", "slurm-fleet.sbatch", "torchrun.sh"):
        check = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, (name, check.stderr)
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR")}
    proc = subprocess.run(["bash", str(LAUNCH / "torchrun.sh"), "--suite", "quick"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "NODE_RANK: set NODE_RANK" in proc.stderr


def test_two_node_job_writes_one_run_folder_with_the_ranks_of_both_nodes(slurm, tmp_path):
    out = tmp_path / "results"
    log = tmp_path / "job.out"
    # Submitted from a folder outside the checkout: the script finds the project's
    # environment from its own path, not from the submit folder.
    proc = sbatch(slurm, LAUNCH / "slurm.sbatch",
                  ["--suite", str(SUITES / "two_node_allreduce.yaml"), "--out", str(out), "--no-report"],
                  tmp_path, log, "--wait")
    text = log.read_text() if log.exists() else "(no job output)"
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{text}"
    job = job_id(proc)
    runs = [p for p in out.iterdir() if (p / "manifest.json").exists()]
    assert len(runs) == 1, (runs, text)
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["label"] == f"slurm-{job}"
    ranks = sorted(manifest["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    assert sorted(r["slurm_node"] for r in ranks) == ["n1", "n2"]
    launcher = manifest["config"]["launcher"]
    assert launcher["world_size"] == 2 and launcher["local_world_size"] == 1
    assert launcher["run_id"] == job  # torchrun's --rdzv-id is the Slurm job id
    cases = pd.read_parquet(runs[0] / "cases.parquet")
    assert len(cases) == 2 and set(cases["status"]) == {"ok"}, cases[["case_id", "status", "reason"]]
    assert all(c.endswith("@torchrun:cpux2") for c in cases["case_id"])
    samples = pd.read_parquet(runs[0] / "samples.parquet")
    assert sorted(samples["rank"].unique()) == [0, 1]
    # One torchrun per node, each with one CPU rank (no GPU in the allocation).
    assert "node n1 (node rank 0): 1 rank(s), 0 GPU(s)" in text
    assert "node n2 (node rank 1): 1 rank(s), 0 GPU(s)" in text


@pytest.mark.parametrize("job_env,nproc,cpu", [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2, False),
    ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4, False),
    ({}, 1, True),
    ({"COHERENCE_CPU_RANKS": "3"}, 3, True),
], ids=["cuda-visible", "gpus-on-node", "cpu", "cpu-ranks"])
def test_ranks_per_node_follow_the_allocation(slurm, tmp_path, job_env, nproc, cpu):
    """Dry run: each node prints its torchrun command. GPUs in the job's environment (as
    Slurm's gres plugin sets them on a GPU partition) give one rank each and no
    --devices cpu; without any, CPU ranks. User arguments come after the defaults, so
    they win."""
    log = tmp_path / "job.out"
    job, code = run_job(slurm, LAUNCH / "slurm.sbatch", ["--suite", "quick", "--label", "mine"], REPO, log,
                        COHERENCE_LAUNCH_DRY_RUN="1", **job_env)
    text = log.read_text()
    assert code == 0, text
    commands = [line for line in text.splitlines() if "would run:" in line]
    assert len(commands) == 2, text
    defaults = f"run --label slurm-{job}" + (" --devices cpu" if cpu else "")
    for line in commands:
        assert "--nnodes=2" in line and f"--nproc-per-node={nproc} " in line and "--rdzv-backend=c10d" in line
        assert f"--rdzv-id={job}" in line
        assert line.endswith(f"{defaults} --suite quick --label mine"), line


def test_missing_environment_is_one_line_and_exit_2(slurm, tmp_path):
    log = tmp_path / "job.out"
    _, code = run_job(slurm, LAUNCH / "slurm.sbatch", ["--suite", "quick"], tmp_path, log,
                      COHERENCE_VENV=str(tmp_path / "no-venv"))
    text = log.read_text()
    assert code == 2, text
    assert f"no Python at {tmp_path / 'no-venv'}/bin/python" in text
    assert "Traceback" not in text


def test_fleet_sweep_runs_each_node_and_the_fleet_view(slurm, tmp_path):
    out = tmp_path / "fleet"
    log = tmp_path / "job.out"
    job, code = run_job(slurm, LAUNCH / "slurm-fleet.sbatch",
                        ["--suite", str(SUITES / "one_node_memory.yaml"), "--out", str(out), "--no-report"],
                        tmp_path, log)
    text = log.read_text() if log.exists() else "(no job output)"
    assert code == 0, text
    run_ids = {}
    for node in ("n1", "n2"):
        runs = [p for p in (out / node).iterdir() if (p / "manifest.json").exists()]
        assert len(runs) == 1, (node, runs, text)
        manifest = json.loads((runs[0] / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["label"] == f"fleet-{job}"
        assert "ranks" not in manifest or not manifest["ranks"]  # single-node runs, not a torchrun group
        run_ids[node] = runs[0].name
    assert run_ids["n1"] != run_ids["n2"]
    with open(out / "fleet.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run_id"] for r in rows} == set(run_ids.values())
    assert f"fleet: 2 node(s) under {out}" in text


def test_fleet_sweep_names_a_node_without_a_run_folder_and_goes_on(slurm, tmp_path):
    """A node whose run writes nothing (here n2: its folder under --out is taken by a
    file) is named in the output; the fleet view covers the others and the job exits
    non-zero."""
    out = tmp_path / "fleet"
    out.mkdir()
    (out / "n2").write_text("not a folder")
    log = tmp_path / "job.out"
    _, code = run_job(slurm, LAUNCH / "slurm-fleet.sbatch",
                      ["--suite", str(SUITES / "one_node_memory.yaml"), "--out", str(out), "--no-report"],
                      tmp_path, log)
    text = log.read_text() if log.exists() else "(no job output)"
    assert code == 1, text
    assert f"node n2 wrote no run folder under {out}/n2" in text
    assert "node n1 wrote no run folder" not in text
    assert f"fleet: 1 node(s) under {out}" in text
    assert len([p for p in (out / "n1").iterdir() if (p / "manifest.json").exists()]) == 1


def test_cluster_settings_run_without_munge_cgroups_or_other_interfaces(tmp_path):
    """The settings an unprivileged container needs (no munge, no cgroups) and the ones
    that keep every daemon on 127.0.0.1; no Slurm needed to check them."""
    text = slurm_conf(tmp_path, 6817, {"n1": 6818, "n2": 6819}, 2, "root")
    settings = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith(("NodeName", "PartitionName")))
    assert settings["AuthType"] == "auth/none" and settings["CredType"] == "cred/none"
    assert settings["ProctrackType"] == "proctrack/linuxproc" and settings["TaskPlugin"] == "task/none"
    assert settings["SlurmctldPort"] == "6817" and settings["SlurmctldHost"].endswith("(127.0.0.1)")
    assert set(settings["CommunicationParameters"].split(",")) == {"NoCtldInAddrAny", "NoInAddrAny"}
    assert all(settings[k].startswith(str(tmp_path)) for k in ("StateSaveLocation", "SlurmdSpoolDir",
                                                                 "SlurmctldPidFile", "SlurmdLogFile"))
    nodes = [dict(f.split("=", 1) for f in line.split()) for line in text.splitlines() if line.startswith("NodeName=")]
    assert [(n["NodeName"], n["NodeAddr"], n["Port"]) for n in nodes] == [("n1", "127.0.0.1", "6818"),
                                                                          ("n2", "127.0.0.1", "6819")]


def test_cluster_without_slurm_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("tests.launch.slurm_cluster.shutil.which", lambda name, path=None: None)
    with pytest.raises(SlurmUnavailable, match=r"Slurm is not installed \(slurmctld, slurmd, sbatch"):
        SlurmCluster(tmp_path / "c").start()
