"""Damaged result files (issue 17 items 4, 6, 7, 10; issue 14 item 7).

One tiny real run is made once for the module; each test damages a copy. Every command
that loads runs must answer a damaged file with exit code 2 and one stderr line naming
the file, never a traceback; a partial run with a damaged part resumes, runs the case
again and records the damage; a full disk keeps the finished cases and leaves no
temporary file. Mounts need root (skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main
from tests.conftest import coherence

SUITE = """
plugins: [tests.plugins.fault_probes]
timeout_s: 60
timing: {warmup: 1, min_reps: 3, max_reps: 4, budget_s: 0.2}
probes:
  testing.counter:
    params: {i: [0, 1, 2], seconds: 0.002}
"""

FULL_DISK_SUITE = """
plugins: [tests.plugins.fault_probes, tests.plugins.disk_probes]
timeout_s: 60
timing: {warmup: 1, min_reps: 3, max_reps: 4, budget_s: 0.2}
probes:
  testing.counter:
    params: {i: [0, 1], seconds: 0.002}
  testing.fills_disk: {}
"""


def _run(suite_text: str, out, tmp, env: dict | None = None) -> subprocess.CompletedProcess:
    suite = tmp / "suite.yaml"
    suite.write_text(suite_text)
    return coherence("run", "--suite", str(suite), "--out", str(out), "--devices", "cpu", "--quiet", env=env,
                     timeout=300)


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """A finished run folder (with indicators.json and report.html), made under umask 022."""
    tmp = tmp_path_factory.mktemp("base")
    old = os.umask(0o022)
    try:
        proc = _run(SUITE, tmp / "results", tmp)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    return tmp / "results" / proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]


def copy_run(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def make_partial(run, drop_last: int = 1):
    """Turn a finished run back into the partial run it was before finalize: per-case
    parts rebuilt from samples/telemetry by each journal line's ``_part``, the merged
    tables gone, the manifest ``partial``, and the last ``drop_last`` journal lines
    dropped (those cases did not finish)."""
    lines = [json.loads(x) for x in (run / "cases.jsonl").read_text().splitlines() if x.strip()]
    keep = lines[:len(lines) - drop_last]
    samples = pd.read_parquet(run / "samples.parquet")
    telemetry = pd.read_parquet(run / "telemetry.parquet")
    parts = run / "parts"
    parts.mkdir(exist_ok=True)
    for line in keep:
        s = samples[(samples["case_id"] == line["case_id"]) & (samples["round"] == line["_round"])]
        s.to_parquet(parts / f"samples-{line['_part']:05d}.parquet", index=False)
        t = telemetry[(telemetry["case_id"] == line["case_id"]) & (telemetry["round"] == line["_round"])]
        if len(t):
            t.to_parquet(parts / f"telemetry-{line['_part']:05d}.parquet", index=False)
    (run / "cases.jsonl").write_text("".join(json.dumps(line) + "\n" for line in keep))
    for name in ("samples.parquet", "telemetry.parquet", "cases.parquet", "indicators.json", "report.html"):
        (run / name).unlink(missing_ok=True)
    doc = json.loads((run / "manifest.json").read_text())
    doc.update(status="partial", finished_at=None)
    (run / "manifest.json").write_text(json.dumps(doc))
    return keep


def cli(*args: str):
    """Run the CLI in this process (the same group and error handling as the console
    script; faster than a subprocess for many commands). Returns (exit code, stderr)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr, result.exception


def cli_out(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout + result.stderr, result.exception


def check_command(name, args, culprit: str, what: str):
    """``name`` run with ``args`` on a damaged run: exit 2 and one line naming
    ``culprit``, or for fleet: the node skipped with the culprit named."""
    if name in SKIPS_DAMAGED_NODES:
        code, out, exc = cli_out(*args)
        assert code == 0 and culprit in " ".join(out.split()) and "Traceback" not in out, f"{what}: {code} {out!r} {exc!r}"
        return
    code, err, exc = cli(*args)
    assert_one_line(code, err, exc, culprit, what)


def assert_one_line(code, err, exc, culprit: str, what: str):
    assert code == 2, f"{what}: exit {code}, stderr {err!r}, exception {exc!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], f"{what}: {err!r}"
    assert "Traceback" not in err


# -- damage kinds: (name, file named in the message, mutation of a run folder) ----------
def _json_edit(file, fn):
    doc = json.loads(file.read_text())
    doc = fn(doc)
    file.write_text(json.dumps(doc))


def _set(key, value):
    def fn(doc):
        doc[key] = value
        return doc
    return fn


def _drop(key):
    def fn(doc):
        doc.pop(key, None)
        return doc
    return fn


def _table_edit(file, fn):
    df = pd.read_parquet(file)
    fn(df).to_parquet(file, index=False)


def _col(col, value):
    def fn(df):
        df = df.copy()
        df[col] = value
        return df
    return fn


DAMAGE = {
    "manifest: schema_version true": ("manifest.json", lambda r: _json_edit(r / "manifest.json", _set("schema_version", True))),
    "manifest: not an object": ("manifest.json", lambda r: (r / "manifest.json").write_text("[1, 2]")),
    "manifest: truncated": ("manifest.json", lambda r: (r / "manifest.json").write_text('{"schema_version": 2, "run')),
    "manifest: no status": ("manifest.json", lambda r: _json_edit(r / "manifest.json", _drop("status"))),
    "manifest: status a number": ("manifest.json", lambda r: _json_edit(r / "manifest.json", _set("status", 3))),
    "manifest: sessions a string": ("manifest.json", lambda r: _json_edit(r / "manifest.json", _set("sessions", "x"))),
    "manifest: run_id a list": ("manifest.json", lambda r: _json_edit(r / "manifest.json", _set("run_id", ["a"]))),
    "cases: p50_s a string": ("cases.parquet", lambda r: _table_edit(r / "cases.parquet", _col("p50_s", "fast"))),
    "cases: status an integer": ("cases.parquet", lambda r: _table_edit(r / "cases.parquet", _col("status", 1))),
    "cases: unknown status": ("cases.parquet", lambda r: _table_edit(r / "cases.parquet", _col("status", "great"))),
    "cases: duplicate case ids": ("cases.parquet", lambda r: _table_edit(
        r / "cases.parquet", lambda df: pd.concat([df, df.iloc[:1]], ignore_index=True))),
    "cases: no case_id": ("cases.parquet", lambda r: _table_edit(r / "cases.parquet", lambda df: df.drop(columns=["case_id"]))),
    "cases: not parquet": ("cases.parquet", lambda r: (r / "cases.parquet").write_bytes(b"PAR1 garbage")),
    "samples: duration_s a string": ("samples.parquet", lambda r: _table_edit(r / "samples.parquet", _col("duration_s", "1s"))),
    "samples: no case_id": ("samples.parquet", lambda r: _table_edit(
        r / "samples.parquet", lambda df: df.drop(columns=["case_id"]))),
    "samples: truncated": ("samples.parquet", lambda r: (r / "samples.parquet").write_bytes(
        (r / "samples.parquet").read_bytes()[:100])),
    "telemetry: value a string": ("telemetry.parquet", lambda r: pd.DataFrame(
        {"t_s": [0.1], "case_id": ["x"], "source": ["cpu"], "metric": ["util"], "value": ["high"]}).to_parquet(
        r / "telemetry.parquet", index=False)),
    "telemetry: no metric": ("telemetry.parquet", lambda r: pd.DataFrame(
        {"t_s": [0.1], "case_id": ["x"], "source": ["cpu"], "value": [1.0]}).to_parquet(r / "telemetry.parquet", index=False)),
    "indicators: not JSON": ("indicators.json", lambda r: (r / "indicators.json").write_text("{\"mode1\": ")),
    "indicators: a list": ("indicators.json", lambda r: (r / "indicators.json").write_text("[]")),
    "indicators: mode1 a list": ("indicators.json", lambda r: _json_edit(r / "indicators.json", _set("mode1", []))),
    "indicators: a count as text": ("indicators.json", lambda r: _json_edit(r / "indicators.json", _set("summary", {"pass": "3"}))),
    "indicators: serving entry without case_id": ("indicators.json", lambda r: _json_edit(
        r / "indicators.json", _set("serving", [{"kappa": 1}]))),
}

# What each loading command reads: show and fleet read the manifest, the cases and
# indicators.json (summaries, never raw samples); the others load the whole run
# (harness.results.load_path).
SUMMARY_FILES = ("manifest.json", "cases.parquet", "cases.jsonl", "indicators.json")
# fleet is descriptive: a damaged node is left out of the view, named with its reason,
# and the view goes on (exit 0); every other command stops with exit 2.
SKIPS_DAMAGED_NODES = ("fleet",)


def loading_commands(run, good, tmp_path):
    return {
        "show": ("show", str(run)),
        "collect": ("collect", str(run), "--quiet"),
        "compare": ("compare", str(good), str(run)),
        "export": ("export", str(run), "--format", "csv", "-o", str(tmp_path / "x.csv")),
        "report": ("report", str(run), "-o", str(tmp_path / "r.html")),
        "fleet": ("fleet", str(run)),
    }


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_one_line_and_exit_2_in_every_loading_command(complete_run, tmp_path, damage):
    culprit, mutate = DAMAGE[damage]
    good = copy_run(complete_run, tmp_path, "good")
    run = copy_run(complete_run, tmp_path, "bad")
    mutate(run)
    def contents():  # .lock is the run-folder lock's bookkeeping (harness.runlock), not a result
        return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}

    before = contents()
    for name, args in loading_commands(run, good, tmp_path).items():
        if name in ("show", "fleet") and culprit not in SUMMARY_FILES:
            continue
        if name == "collect" and culprit == "indicators.json":
            continue  # collect writes it anew: below
        check_command(name, args, str(run / culprit), f"{damage} / {name}")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "r.html").exists()
    # Nothing in the damaged run was rewritten by a command that failed on it.
    assert contents() == before
    if culprit == "indicators.json":
        # The remedy for a damaged indicators.json: collect replaces it, then all read it.
        code, err, exc = cli("collect", str(run), "--quiet")
        assert code == 0 and exc is None, err
        assert json.loads((run / "indicators.json").read_text()) == json.loads((good / "indicators.json").read_text()) \
            | {"generated_at": json.loads((run / "indicators.json").read_text())["generated_at"]}
        assert cli("show", str(run))[0] == 0


PARTIAL_DAMAGE = {
    "journal: a line that is JSON but not an object": lambda r: _insert_line(r, "[1, 2]"),
    "journal: p50_s a string": lambda r: _insert_line(r, json.dumps({"case_id": "x@cpu:0", "status": "ok", "p50_s": "1 ms"})),
    "journal: unknown status": lambda r: _insert_line(r, json.dumps({"case_id": "x@cpu:0", "status": 7})),
    "journal: not JSON in the middle": lambda r: _insert_line(r, "{not json"),
    "journal: a case journaled twice": lambda r: _insert_line(r, (r / "cases.jsonl").read_text().splitlines()[0]),
}


def _insert_line(run, text):
    lines = (run / "cases.jsonl").read_text().splitlines()
    lines.insert(1, text)
    (run / "cases.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage", list(PARTIAL_DAMAGE))
def test_a_damaged_journal_line_of_a_partial_run_is_named_with_its_line(complete_run, tmp_path, damage):
    good = copy_run(complete_run, tmp_path, "good")
    run = copy_run(complete_run, tmp_path, "bad")
    make_partial(run)
    PARTIAL_DAMAGE[damage](run)
    for name, args in loading_commands(run, good, tmp_path).items():
        check_command(name, args, f"{run / 'cases.jsonl'} line 2", f"{damage} / {name}")


def test_a_damaged_part_of_a_partial_run_is_named(complete_run, tmp_path):
    good = copy_run(complete_run, tmp_path, "good")
    run = copy_run(complete_run, tmp_path, "bad")
    make_partial(run)
    part = run / "parts" / "samples-00000.parquet"
    part.write_bytes(b"PAR1 not a table")
    for name, args in loading_commands(run, good, tmp_path).items():
        if name in ("show", "fleet"):
            continue  # they read the journal, not the samples
        check_command(name, args, str(part), name)


def test_resume_of_a_manifest_without_environment_is_one_line(complete_run, tmp_path):
    run = copy_run(complete_run, tmp_path)
    make_partial(run)
    _json_edit(run / "manifest.json", _drop("environment"))
    code, err, exc = cli("run", "--resume", str(run), "--quiet")
    assert_one_line(code, err, exc, str(run / "manifest.json"), "resume")
    assert "environment" in err


def test_resume_of_a_damaged_manifest_is_one_line(complete_run, tmp_path):
    run = copy_run(complete_run, tmp_path)
    make_partial(run)
    _json_edit(run / "manifest.json", _set("schema_version", True))
    code, err, exc = cli("run", "--resume", str(run), "--quiet")
    assert_one_line(code, err, exc, str(run / "manifest.json"), "resume")


def test_every_file_of_a_run_folder_is_0644(complete_run):
    files = [p for p in complete_run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"manifest.json", "cases.parquet", "samples.parquet", "telemetry.parquet", "indicators.json",
            "report.html", "cases.jsonl"} <= names
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_export_and_report_do_not_replace_a_symlink_or_a_fifo(complete_run, tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("keep me")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for target, kind in ((link, "symbolic link"), (fifo, "FIFO")):
        code, err, exc = cli("export", str(complete_run), "--format", "csv", "-o", str(target))
        assert_one_line(code, err, exc, str(target), kind)
        assert kind in err
        code, err, exc = cli("report", str(complete_run), "-o", str(target))
        assert_one_line(code, err, exc, str(target), f"report {kind}")
    assert link.is_symlink() and real.read_text() == "keep me" and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_runs_a_case_with_a_damaged_part_again_and_records_the_damage(complete_run, tmp_path):
    run = copy_run(complete_run, tmp_path)
    kept = make_partial(run)  # the last case did not finish
    damaged_case = kept[0]["case_id"]
    (run / "parts" / f"samples-{kept[0]['_part']:05d}.parquet").write_bytes(b"PAR1 not a table")
    _insert_line(run, "[1, 2]")  # a journal line that is JSON but not a row: dropped
    proc = coherence("run", "--resume", str(run), "--quiet", "--no-report", timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    damaged = manifest["sessions"][-1]["damaged"]
    by_file = {d["file"]: d for d in damaged}
    part = f"parts/samples-{kept[0]['_part']:05d}.parquet"
    assert by_file[part]["case_id"] == damaged_case and by_file[part]["round"] == 0
    assert by_file["cases.jsonl"]["line"] == 2 and "not an object" not in by_file[part]["problem"]
    assert "JSON object" in by_file["cases.jsonl"]["problem"]
    cases = pd.read_parquet(run / "cases.parquet")
    assert sorted(cases["case_id"]) == sorted(json.loads(x)["case_id"]
                                              for x in (complete_run / "cases.jsonl").read_text().splitlines())
    assert set(cases["status"]) == {"ok"} and cases["case_id"].is_unique
    samples = pd.read_parquet(run / "samples.parquet")
    # The damaged case was measured once more, not added to what it had: one sample per rep.
    mine = samples[samples["case_id"] == damaged_case]
    assert len(mine) and mine["rep"].is_unique
    assert int(cases.set_index("case_id").loc[damaged_case, "n"]) == len(mine)
    assert not list(run.rglob("*.tmp"))


# -- full and read-only disks (root: a small tmpfs) ------------------------------------
def _mount(where, opts: str):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (full or read-only file system)")
    where.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _umount(where):
    subprocess.run(["umount", str(where)], capture_output=True, timeout=30)


def test_collect_on_a_read_only_run_folder_is_one_line(complete_run, tmp_path):
    mnt = tmp_path / "ro"
    _mount(mnt, "size=4m")
    try:
        run = copy_run(complete_run, mnt)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, timeout=30)
        code, err, exc = cli("collect", str(run), "--quiet")
        # The run-folder lock (harness.runlock) or indicators.json: a file of this run.
        assert_one_line(code, err, exc, str(run) + "/", "collect")
        assert "Read-only file system" in err
        code, err, exc = cli("run", "--suite", "quick", "--out", str(mnt), "--devices", "cpu", "--quiet")
        assert_one_line(code, err, exc, f"--out {mnt}", "run --out read-only")
    finally:
        _umount(mnt)


def test_a_full_disk_mid_run_is_one_line_keeps_finished_cases_and_resumes_elsewhere(tmp_path):
    mnt = tmp_path / "full"
    _mount(mnt, "size=2m")
    try:
        proc = _run(FULL_DISK_SUITE, mnt, tmp_path, env={"COHERENCE_TEST_FILL_DIR": str(mnt)})
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in proc.stderr
        (run,) = [p for p in mnt.iterdir() if p.is_dir()]
        assert str(run) in lines[0]
        assert not list(mnt.rglob("*.tmp"))
        journal = [json.loads(x) for x in (run / "cases.jsonl").read_text().splitlines()]
        assert all("fills_disk" not in j["case_id"] for j in journal)  # its commit failed
        for j in journal:  # every finished case kept with its samples
            assert (run / "parts" / f"samples-{j['_part']:05d}.parquet").exists()
        # Resuming on the full disk: one line, before any case runs.
        again = coherence("run", "--resume", str(run), "--quiet", timeout=120)
        assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
        elsewhere = copy_run(run, tmp_path, run.name)
    finally:
        _umount(mnt)
    done = coherence("run", "--resume", str(elsewhere), "--quiet", "--no-report", timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((elsewhere / "manifest.json").read_text())["status"] == "complete"
    cases = pd.read_parquet(elsewhere / "cases.parquet")
    assert len(cases) == 3 and set(cases["status"]) == {"ok"}
    assert not list(elsewhere.rglob("*.tmp"))


def test_a_failed_journal_write_leaves_no_half_line(tmp_path, monkeypatch):
    import errno

    from harness.errors import UserError
    from harness.store import RunStore

    store = RunStore.create(tmp_path, "r", {"environment": {}})
    row = {"case_id": "a@cpu:0", "status": "ok", "n": 0}
    store.append_case(row, pd.DataFrame())
    before = (store.path / "cases.jsonl").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the write lands, its fsync fails: a full disk
    with pytest.raises(UserError) as exc:
        store.append_case({**row, "case_id": "b@cpu:0"}, pd.DataFrame())
    monkeypatch.undo()
    msg = str(exc.value)
    assert "\n" not in msg and "cases.jsonl: cannot write (No space left on device)" in msg and "--resume" in msg
    assert (store.path / "cases.jsonl").read_bytes() == before
    assert [r["case_id"] for r in store.journal_rows()] == ["a@cpu:0"]
