"""Bad input, tried the way careless users and failing machines do it (issue 17).

Four categories, each input a separate test case:

* malformed suites (``coherence run --suite FILE`` / ``coherence list --suite FILE``);
* CLI misuse (bad options and values, missing or extra arguments, bad --config files);
* corrupt run folders: a tiny real run, made once for the module, copied per case and
  damaged one way, then read by show / export / collect / report / compare / fleet;
* corrupt partial runs for ``coherence run --resume``: a real run killed after its first
  case, copied per case and damaged.

For every input: exit code 2, exactly one line on stderr naming the culprit, no
traceback, and no file outside the run (the case's whole temporary tree, the current
folder included) created, removed or changed. Commands run in-process through click's
CliRunner (fast); the few that need a real process (exit code and stderr of the
console entry itself) use a subprocess.

The counts table of the issue (per category: tried / one line exit 2 / traceback /
bad input accepted / exit 2 several lines / other) is printed at the end of the module
(on the terminal, also under -q) and kept in ``COUNTS``; ``counts_table()`` formats it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from harness.cli import main

REPO = Path(__file__).resolve().parents[2]

CATEGORIES = ("malformed suites", "CLI misuse", "corrupt run folders", "--resume of corrupt partial runs")
OUTCOMES = ("one line, exit 2", "traceback", "bad input accepted", "exit 2, several lines", "other")
COUNTS: dict[str, dict[str, int]] = {c: dict.fromkeys(OUTCOMES, 0) for c in CATEGORIES}

GOOD_SUITE = """\
name: tiny
timeout_s: 60
rounds: 1
timing: {warmup: 1, min_reps: 2, max_reps: 3, budget_s: 0.05}
probes:
  memory.copy: {params: {size_mib: [1]}}
"""


# -- recording and checking one attempt ---------------------------------------------------
def classify(exit_code: int, stderr: str, crashed: bool) -> str:
    """One attempt's row of the counts table."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if crashed or "Traceback" in stderr:
        return "traceback"
    if exit_code == 2:
        return "one line, exit 2" if len(lines) == 1 else "exit 2, several lines"
    if exit_code in (0, 1):
        return "bad input accepted"
    return "other"


def counts_table() -> str:
    """The issue's table, redone from COUNTS (Markdown)."""
    head = "| what was tried | tried | " + " | ".join(OUTCOMES) + " |"
    rows = [head, "|" + "---|" * (len(OUTCOMES) + 2)]
    for cat, row in COUNTS.items():
        rows.append(f"| {cat} | {sum(row.values())} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
    return "\n".join(rows)


@pytest.fixture(scope="module", autouse=True)
def _print_counts(request):
    yield
    if any(sum(r.values()) for r in COUNTS.values()):
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        text = "\n" + counts_table() + "\n"
        if capture is not None:
            with capture.global_and_fixture_disabled():
                sys.stdout.write(text)
        else:  # pragma: no cover - run without pytest's capture plugin
            sys.stdout.write(text)


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple]:
    """Every path under ``root`` (except ``exclude`` and what is under it): its type and,
    for files, size, mtime and a hash of its bytes. A folder's own mtime is left out: the
    --out check (harness.atomic.check_output_dir) creates and removes a probe file in it."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        if exclude is not None and (p == exclude or exclude in p.parents):
            continue
        st = p.lstat()
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        else:
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode),)
    return out


def check(category: str, root: Path, args: list[str], culprit: str | tuple[str, ...], *,
          run: Path | None = None, env: dict | None = None, monkeypatch=None) -> str:
    """Invoke ``coherence ARGS`` in ``root`` (its cwd) and assert the bad-input contract;
    returns the error line."""
    before = snapshot(root, run)
    if monkeypatch is not None:
        monkeypatch.chdir(root)
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=True)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    stderr = result.stderr
    if crashed:
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    outcome = classify(result.exit_code, stderr, crashed)
    COUNTS[category][outcome] += 1
    assert outcome == "one line, exit 2", f"{outcome} (exit {result.exit_code}):\n{stderr}\n{result.stdout[-2000:]}"
    line = stderr.strip()
    wanted = (culprit,) if isinstance(culprit, str) else culprit
    assert any(w in line for w in wanted), f"the error does not name {wanted}: {line}"
    assert snapshot(root, run) == before, "a file outside the run was created, removed or changed"
    return line


# -- shared material ------------------------------------------------------------------------
PLUGINS = {
    "c17_plugin_runtime": "raise RuntimeError('plugin exploded on import')\n",
    "c17_plugin_syntax": "def broken(:\n    pass\n",
    "c17_plugin_exit": "import sys\nsys.exit(3)\n",
    "c17_plugin_keyerror": "{}['missing']\n",
    "c17_plugin_family": (
        "from harness.registry import Probe, register\n"
        "@register\nclass P(Probe):\n    name = 'c17.badfamily'\n    family = 'nonsense'\n"
    ),
    "c17_plugin_noname": (
        "from harness.registry import Probe, register\n"
        "@register\nclass P(Probe):\n    name = ''\n    family = 'memory'\n"
    ),
    "c17_plugin_badname": (
        "from harness.registry import Probe, register\n"
        "@register\nclass P(Probe):\n    name = 'has space[x]@cpu'\n    family = 'memory'\n"
    ),
    "c17_plugin_clash": (
        "from harness.registry import Probe, register\n"
        "@register\nclass Copy(Probe):\n    name = 'memory.copy'\n    family = 'memory'\n"
    ),
}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    for name, text in PLUGINS.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory):
    """Two real runs, made once (in parallel): ``complete``, a finished tiny run (two
    cases, real samples, telemetry and indicators), and ``partial``, a run SIGKILLed
    after its first case was committed (resumable)."""
    base = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (base / "tiny.yaml").write_text(
        GOOD_SUITE.replace("probes:\n", "plugins: [tests.plugins.fault_probes]\nprobes:\n")
        + "  testing.counter: {params: {i: [0], seconds: 0.001}}\n")
    (base / "slow.yaml").write_text(
        "name: slow\nplugins: [tests.plugins.fault_probes]\ntimeout_s: 60\n"
        "timing: {warmup: 0, min_reps: 1, max_reps: 1, budget_s: 10}\n"
        "probes:\n  testing.counter: {params: {i: [0, 1, 2], seconds: 1.5}}\n")
    cmd = [sys.executable, "-m", "harness.cli", "run", "--devices", "cpu", "--quiet", "--no-report"]
    full = subprocess.Popen([*cmd, "--suite", str(base / "tiny.yaml"), "--out", str(base / "complete")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    slow = subprocess.Popen([*cmd, "--suite", str(base / "slow.yaml"), "--out", str(base / "partial")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def journal_lines() -> int:
            files = list((base / "partial").glob("*/cases.jsonl"))
            return len(files[0].read_text().splitlines()) if files else 0

        _wait_for(lambda: journal_lines() >= 1 or slow.poll() is not None, 120, "the first case of the slow run")
    finally:
        # The whole process group: the run, its worker and the worker's children.
        try:
            os.killpg(slow.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        slow.wait(timeout=30)
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err
    complete = _only_run(base / "complete")
    partial = _only_run(base / "partial")
    assert json.loads((partial / "manifest.json").read_text())["status"] == "partial"
    assert (complete / "indicators.json").exists() and (complete / "samples.parquet").exists()
    return {"complete": complete, "partial": partial}


def _place(made: Path, root: Path, name: str | None = None) -> Path:
    """A copy of a made run under ROOT/results/ (renamed: its run id becomes NAME, so
    compare and fleet see two runs, not one run twice)."""
    target = root / "results" / (name or made.name)
    shutil.copytree(made, target)
    if name:
        doc = json.loads((target / "manifest.json").read_text())
        doc["run_id"] = name
        (target / "manifest.json").write_text(json.dumps(doc))
    return target


# -- 1. malformed suites ---------------------------------------------------------------------
def _with(top: str = "", probe: str = "", timing: str = "") -> str:
    """The good suite with extra top-level lines, extra keys in its probe entry, or a
    different timing line."""
    text = GOOD_SUITE
    if timing:
        text = text.replace("timing: {warmup: 1, min_reps: 2, max_reps: 3, budget_s: 0.05}", timing)
    if probe:
        text = text.replace("memory.copy: {params: {size_mib: [1]}}", "memory.copy: {params: {size_mib: [1]}, " + probe + "}")
    return text + top


SUITES = [
    # (id, suite text or bytes, culprit in the line)
    ("timeout-nan", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: .nan"), "timeout_s"),
    ("timeout-inf", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: .inf"), "timeout_s"),
    ("timeout-minus-inf", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: -.inf"), "timeout_s"),
    ("timeout-1e300", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: 1.0e+300"), "timeout_s"),
    ("timeout-huge-int", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: " + "9" * 400), "timeout_s"),
    ("timeout-negative", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: -1"), "timeout_s"),
    ("timeout-zero", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: 0"), "timeout_s"),
    ("timeout-string", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: '60'"), "timeout_s"),
    ("timeout-bool", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: true"), "timeout_s"),
    ("timeout-list", GOOD_SUITE.replace("timeout_s: 60", "timeout_s: [60]"), "timeout_s"),
    ("group-timeout-nan", _with(top="group_timeout_s: .nan\n"), "group_timeout_s"),
    ("group-timeout-inf", _with(top="group_timeout_s: .inf\n"), "group_timeout_s"),
    ("group-timeout-1e300", _with(top="group_timeout_s: 1.0e+300\n"), "group_timeout_s"),
    ("group-timeout-zero", _with(top="group_timeout_s: 0\n"), "group_timeout_s"),
    ("probe-timeout-nan", _with(probe="timeout_s: .nan"), "timeout_s"),
    ("probe-timeout-inf", _with(probe="timeout_s: .inf"), "timeout_s"),
    ("probe-timeout-1e300", _with(probe="timeout_s: 1.0e+300"), "timeout_s"),
    ("probe-timeout-negative", _with(probe="timeout_s: -5"), "timeout_s"),
    ("budget-nan", _with(timing="timing: {budget_s: .nan}"), "budget_s"),
    ("budget-inf", _with(timing="timing: {budget_s: .inf}"), "budget_s"),
    ("budget-1e300", _with(timing="timing: {budget_s: 1.0e+300}"), "budget_s"),
    ("warmup-s-nan", _with(timing="timing: {warmup_s: .nan}"), "warmup_s"),
    ("max-reps-huge", _with(timing="timing: {max_reps: 100000000000}"), "max_reps"),
    ("min-reps-zero", _with(timing="timing: {min_reps: 0}"), "min_reps"),
    ("max-below-min", _with(timing="timing: {min_reps: 10, max_reps: 2}"), "max_reps"),
    ("warmup-float", _with(timing="timing: {warmup: 1.5}"), "warmup"),
    ("timing-unknown-key", _with(timing="timing: {reps: 3}"), "reps"),
    ("timing-not-mapping", _with(timing="timing: fast"), "timing"),
    ("probe-budget-nan", _with(probe="timing: {budget_s: .nan}"), "budget_s"),
    ("probe-timing-unknown", _with(probe="timing: {speed: 2}"), "speed"),
    ("rounds-zero", GOOD_SUITE.replace("rounds: 1", "rounds: 0"), "rounds"),
    ("rounds-huge", GOOD_SUITE.replace("rounds: 1", "rounds: 100000"), "rounds"),
    ("rounds-float", GOOD_SUITE.replace("rounds: 1", "rounds: 1.5"), "rounds"),
    ("rounds-nan", GOOD_SUITE.replace("rounds: 1", "rounds: .nan"), "rounds"),
    ("cpu-ranks-zero", _with(top="cpu_ranks: 0\n"), "cpu_ranks"),
    ("cpu-ranks-huge", _with(top="cpu_ranks: 100000\n"), "cpu_ranks"),
    ("cpu-ranks-string", _with(top="cpu_ranks: '4'\n"), "cpu_ranks"),
    ("duplicate-top-key", GOOD_SUITE + "timeout_s: 5\n", "duplicate key 'timeout_s'"),
    ("duplicate-probe", GOOD_SUITE + "  memory.copy: {}\n", "duplicate key 'memory.copy'"),
    ("duplicate-timing-key", _with(timing="timing: {min_reps: 2, min_reps: 3}"), "duplicate key 'min_reps'"),
    ("nominal-unknown-type", _with(top="nominal: {npu: {memory_Bps: 1.0e+12}}\n"), "npu"),
    ("nominal-unknown-word", _with(top="nominal: {quantum9: {memory_Bps: 1.0e+12}}\n"), "quantum9"),
    ("nominal-unknown-id-type", _with(top="nominal: {'xpu:0': {memory_Bps: 1.0e+12}}\n"), "xpu"),
    ("nominal-nan", _with(top="nominal: {cuda: {memory_Bps: .nan}}\n"), "memory_Bps"),
    ("nominal-negative", _with(top="nominal: {cpu: {fp32: -1.0e+12}}\n"), "fp32"),
    ("nominal-unknown-field", _with(top="nominal: {cpu: {bogus_Bps: 1}}\n"), "bogus_Bps"),
    ("nominal-not-mapping", _with(top="nominal: {'cpu:0': 5}\n"), "cpu:0"),
    ("nominal-bad-dtype", _with(top="nominal: {cpu: {compute_flops: {fp7: 1.0e+12}}}\n"), "fp7"),
    ("indicators-threshold-number", _with(top="indicators: {thresholds: {mode1.drift: 5}}\n"), "mode1.drift"),
    ("indicators-threshold-string", _with(top="indicators: {thresholds: {mode1.drift: high}}\n"), "mode1.drift"),
    ("indicators-warn-nan", _with(top="indicators: {thresholds: {mode1.drift: {warn: .nan}}}\n"), "warn"),
    ("indicators-warn-string", _with(top="indicators: {thresholds: {mode1.drift: {warn: 'x'}}}\n"), "warn"),
    ("indicators-unknown-indicator", _with(top="indicators: {thresholds: {mode9.magic: {warn: 1}}}\n"), "mode9.magic"),
    ("indicators-better-sideways", _with(top="indicators: {thresholds: {mode1.drift: {better: sideways}}}\n"), "better"),
    ("indicators-fail-before-warn", _with(top="indicators: {thresholds: {mode1.drift: {warn: 5, fail: 1}}}\n"), "mode1.drift"),
    ("indicators-theta-string", _with(top="indicators: {accessible_theta: half}\n"), "accessible_theta"),
    ("indicators-slo-inf", _with(top="indicators: {slo: {default: {ttft_s: .inf}}}\n"), "ttft_s"),
    ("indicators-slo-new-shape-bad", _with(top="indicators: {slo: {my-model: {ttft_s: fast}}}\n"), "my-model"),
    ("indicators-unknown-key", _with(top="indicators: {bogus: 1}\n"), "bogus"),
    ("indicators-not-mapping", _with(top="indicators: 5\n"), "indicators"),
    ("binary", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "suite.yaml"),
    ("utf16", GOOD_SUITE.encode("utf-16"), "suite.yaml"),
    ("latin1", GOOD_SUITE.replace("name: tiny", "name: tiny\ndescription: caf\xe9").encode("latin-1"), "suite.yaml"),
    ("nul-bytes", GOOD_SUITE.encode() + b"\x00\x00", "suite.yaml"),
    ("empty", "", "suite.yaml"),
    ("top-level-list", "- memory.copy\n- gemm.square\n", "suite.yaml"),
    ("top-level-scalar", "just words\n", "suite.yaml"),
    ("invalid-yaml", "probes:\n  memory.copy: {params: [\n", "suite.yaml"),
    ("tab-indent", "probes:\n\tmemory.copy: {}\n", "suite.yaml"),
    ("nested-too-deep", "probes: " + "[" * 3000 + "]" * 3000 + "\n", "suite.yaml"),
    ("anchor-bomb", "probes:\n  memory.copy:\n    params:\n      size_mib: [&b [&a [1, 1, 1, 1, 1, 1, 1, 1], *a, *a, *a, "
     "*a, *a, *a, *a], *b, *b, *b, *b, *b, *b, *b]\n", "size_mib"),
    ("unknown-top-key", _with(top="probez: {}\n"), "probez"),
    ("probes-empty", "name: x\nprobes: {}\n", "probes"),
    ("probes-list", "name: x\nprobes: [memory.copy]\n", "probes"),
    ("unknown-probe", GOOD_SUITE.replace("memory.copy:", "memory.kopy:"), "memory.kopy"),
    ("unknown-param", GOOD_SUITE.replace("size_mib", "size_gib"), "size_gib"),
    ("param-bool", GOOD_SUITE.replace("[1]", "[true]"), "size_mib"),
    ("param-empty-list", GOOD_SUITE.replace("[1]", "[]"), "size_mib"),
    ("param-bad-choice", GOOD_SUITE.replace("{size_mib: [1]}", "{size_mib: [1], dtype: [fp128]}"), "fp128"),
    ("probe-entry-string", GOOD_SUITE.replace("{params: {size_mib: [1]}}", "fast"), "memory.copy"),
    ("probe-unknown-key", _with(probe="repeat: 3"), "repeat"),
    ("probe-name-number", GOOD_SUITE + "  123: {}\n", "123"),
    ("name-list", GOOD_SUITE.replace("name: tiny", "name: [a, b]"), "name"),
    ("description-number", _with(top="description: 5\n"), "description"),
    ("plugins-not-list", _with(top="plugins: c17_plugin_runtime\n"), "plugins"),
    ("plugins-number", _with(top="plugins: [5]\n"), "plugins"),
    ("plugin-empty-name", _with(top="plugins: ['']\n"), "plugin ''"),
    ("plugin-relative-name", _with(top="plugins: ['.relative']\n"), ".relative"),
    ("plugin-missing", _with(top="plugins: [c17_no_such_module]\n"), "c17_no_such_module"),
    ("plugin-runtime-error", _with(top="plugins: [c17_plugin_runtime]\n"), "c17_plugin_runtime"),
    ("plugin-syntax-error", _with(top="plugins: [c17_plugin_syntax]\n"), "c17_plugin_syntax"),
    ("plugin-sys-exit", _with(top="plugins: [c17_plugin_exit]\n"), "c17_plugin_exit"),
    ("plugin-key-error", _with(top="plugins: [c17_plugin_keyerror]\n"), "c17_plugin_keyerror"),
    ("plugin-bad-family", _with(top="plugins: [c17_plugin_family]\n"), "c17_plugin_family"),
    ("plugin-empty-probe-name", _with(top="plugins: [c17_plugin_noname]\n"), "c17_plugin_noname"),
    ("plugin-bad-probe-name", _with(top="plugins: [c17_plugin_badname]\n"), "c17_plugin_badname"),
    ("plugin-name-clash", _with(top="plugins: [c17_plugin_clash]\n"), "c17_plugin_clash"),
]


@pytest.mark.parametrize("text,culprit", [pytest.param(t, c, id=i) for i, t, c in SUITES])
def test_malformed_suite_is_one_line_exit_2(tmp_path, monkeypatch, plugin_dir, text, culprit):
    monkeypatch.syspath_prepend(str(plugin_dir))
    # The folder that would receive the run exists already (as results/ usually does).
    (tmp_path / "results").mkdir()
    suite = tmp_path / "suite.yaml"
    suite.write_bytes(text if isinstance(text, bytes) else text.encode())
    check("malformed suites", tmp_path,
          ["run", "--suite", str(suite), "--out", str(tmp_path / "results"), "--devices", "cpu", "-q", "--no-report"],
          culprit, monkeypatch=monkeypatch)


SUITE_PATHS = [
    ("directory", lambda root: root.mkdir(parents=True, exist_ok=True), "suite.yaml"),
    ("missing-yaml", None, "suite.yaml"),
    ("unknown-name", "no_such_suite_name", "no_such_suite_name"),
]


@pytest.mark.parametrize("make,culprit", [pytest.param(m, c, id=i) for i, m, c in SUITE_PATHS])
def test_unusable_suite_path_is_one_line_exit_2(tmp_path, monkeypatch, make, culprit):
    ref = str(tmp_path / "suite.yaml")
    if callable(make):
        make(tmp_path / "suite.yaml")
    elif isinstance(make, str):
        ref = make
    check("malformed suites", tmp_path, ["list", "--suite", ref], culprit, monkeypatch=monkeypatch)


def test_a_plugin_named_in_the_environment_is_named_too(tmp_path, monkeypatch, plugin_dir):
    monkeypatch.syspath_prepend(str(plugin_dir))
    suite = tmp_path / "suite.yaml"
    suite.write_text(GOOD_SUITE)
    check("malformed suites", tmp_path, ["list", "--suite", str(suite)], "c17_plugin_runtime",
          env={"COHERENCE_PLUGINS": "c17_plugin_runtime"}, monkeypatch=monkeypatch)


def test_a_failed_plugin_leaves_no_probe_behind(plugin_dir, monkeypatch):
    """A plugin that registered a probe and then failed is rolled back."""
    from harness import registry
    from harness.errors import UserError

    monkeypatch.syspath_prepend(str(plugin_dir))
    (plugin_dir / "c17_plugin_half.py").write_text(
        "from harness.registry import Probe, register\n"
        "@register\nclass P(Probe):\n    name = 'c17.half'\n    family = 'memory'\n"
        "raise RuntimeError('after registering')\n")
    with pytest.raises(UserError, match="c17_plugin_half"):
        registry.discover(["c17_plugin_half"])
    assert "c17.half" not in registry.discover()


def test_world_size_above_the_planning_limit_is_skipped_with_its_reason():
    """`world_size: 64` on a machine with 2 usable cores: planned, skipped, the limit said."""
    from harness import config, registry
    from harness.plan import plan

    registry.discover()
    suite = config.parse_suite({"name": "t", "probes": {"collective.all_reduce": {
        "params": {"size_bytes": [1024], "world_size": [2, 64]}}}}, "t.yaml")
    cpu = [{"id": "cpu:0", "type": "cpu", "backend": "torch"}]
    cases = {c.world_size: c for c in plan(suite, suite.probes, cpu, "torch", {"usable_cores": 2})}
    assert cases[2].skip is None
    assert "64 Gloo ranks" in cases[64].skip and "2 × 2 usable cores" in cases[64].skip
    # world_size auto stops at the limit instead of planning up to cpu_ranks.
    auto = config.parse_suite({"name": "t", "cpu_ranks": 16, "probes": {"collective.all_reduce": {
        "params": {"size_bytes": [1024], "world_size": "auto"}}}}, "t.yaml")
    sizes = sorted(c.world_size for c in plan(auto, auto.probes, cpu, "torch", {"usable_cores": 3}))
    assert sizes == [2, 3, 4, 5, 6]
    # Unknown core count: nothing limited.
    assert max(c.world_size for c in plan(auto, auto.probes, cpu, "torch", {})) == 16


def test_usable_cores_are_capped_by_the_cgroup_quota():
    from harness.plan import host_facts

    env = {"cpu": {"usable_cores": {"value": 8, "source": "x"}, "cgroup_cpu_limit_cores": {"value": 2.5, "source": "y"}}}
    assert host_facts(env)["usable_cores"] == 2
    env["cpu"]["cgroup_cpu_limit_cores"]["value"] = None
    assert host_facts(env)["usable_cores"] == 8


def test_duplicate_keys_from_a_merge_key_are_allowed(tmp_path):
    """YAML merge keys may be overridden; that is not a duplicate."""
    from harness.config import read_yaml

    f = tmp_path / "s.yaml"
    f.write_text("base: &b {warmup: 1, min_reps: 2}\ntiming:\n  <<: *b\n  min_reps: 3\n")
    assert read_yaml(f)["timing"] == {"warmup": 1, "min_reps": 3}


# -- 2. CLI misuse ---------------------------------------------------------------------------------
CLI = [
    # (id, args; "{cfg}" is replaced by a --config file with the given text, culprit)
    ("no-such-command", ["bench"], "bench"),
    ("group-unknown-option", ["--bogus"], "--bogus"),
    ("run-unknown-option", ["run", "--bogus"], "--bogus"),
    ("run-extra-argument", ["run", "quick"], "quick"),
    ("run-timeout-nan", ["run", "--timeout", "nan"], "--timeout"),
    ("run-timeout-inf", ["run", "--timeout", "inf"], "--timeout"),
    ("run-timeout-1e300", ["run", "--timeout", "1e300"], "--timeout"),
    ("run-timeout-negative", ["run", "--timeout", "-1"], "--timeout"),
    ("run-timeout-zero", ["run", "--timeout", "0"], "--timeout"),
    ("run-timeout-text", ["run", "--timeout", "soon"], "--timeout"),
    ("run-timeout-missing-value", ["run", "--timeout"], "--timeout"),
    ("run-cpu-ranks-zero", ["run", "--cpu-ranks", "0"], "--cpu-ranks"),
    ("run-cpu-ranks-negative", ["run", "--cpu-ranks", "-3"], "--cpu-ranks"),
    ("run-cpu-ranks-text", ["run", "--cpu-ranks", "many"], "--cpu-ranks"),
    ("run-cpu-ranks-huge", ["run", "--cpu-ranks", "100000"], "--cpu-ranks"),
    ("run-rounds-zero", ["run", "--rounds", "0"], "--rounds"),
    ("run-rounds-huge", ["run", "--rounds", "1000"], "--rounds"),
    ("run-rounds-text", ["run", "--rounds", "two"], "--rounds"),
    ("run-devices-empty", ["run", "--devices", ""], "--devices"),
    ("run-devices-comma", ["run", "--devices", ","], "--devices"),
    ("run-devices-unknown", ["run", "--suite", "{suite}", "--devices", "npu:0"], "npu:0"),
    ("run-backend-empty", ["run", "--backend", ""], "--backend"),
    ("run-backend-unknown", ["run", "--suite", "{suite}", "--backend", "tensorflow"], "tensorflow"),
    ("run-probe-empty", ["run", "--probe", ""], "--probe"),
    ("run-probe-commas", ["run", "--probe", ",,"], "--probe"),
    ("run-probe-unknown", ["run", "--suite", "{suite}", "--probe", "gemm.cube"], "gemm.cube"),
    ("run-probe-not-in-suite", ["run", "--suite", "{suite}", "--probe", "decode"], "decode"),
    ("run-suite-unknown", ["run", "--suite", "no_such_suite"], "no_such_suite"),
    ("run-resume-with-suite", ["run", "--resume", "x", "--suite", "quick"], "--suite"),
    ("run-resume-missing", ["run", "--resume", "20990101-000000-dead", "--out", "{tmp}"], "20990101-000000-dead"),
    ("list-devices-empty", ["list", "--devices", ""], "--devices"),
    ("list-suite-binary", ["list", "--suite", "{binary}"], "bin.yaml"),
    ("show-missing-run", ["show"], "RUN"),
    ("show-unknown-run", ["show", "20990101-000000-dead", "--results", "{tmp}"], "20990101-000000-dead"),
    ("show-two-runs", ["show", "a", "b"], "b"),
    ("collect-missing-run", ["collect"], "RUN"),
    ("export-bad-format", ["export", "x", "--format", "xml"], "xml"),
    ("export-unknown-run", ["export", "20990101-000000-dead", "--results", "{tmp}"], "20990101-000000-dead"),
    ("report-compare-and-fleet", ["report", "--compare", "--fleet", "a", "b"], "--fleet"),
    ("report-no-run", ["report"], "RUN"),
    ("compare-one-run", ["compare", "a"], "CANDIDATE"),
    ("compare-json-and-markdown", ["compare", "--json", "--markdown", "a", "b"], "--markdown"),
    ("compare-alpha-nan", ["compare", "--alpha", "nan", "a", "b"], "--alpha"),
    ("compare-alpha-inf", ["compare", "--alpha", "inf", "a", "b"], "--alpha"),
    ("compare-alpha-zero", ["compare", "--alpha", "0", "a", "b"], "--alpha"),
    ("compare-alpha-one", ["compare", "--alpha", "1", "a", "b"], "--alpha"),
    ("compare-alpha-text", ["compare", "--alpha", "low", "a", "b"], "--alpha"),
    ("compare-min-floor-nan", ["compare", "--min-floor", "nan", "a", "b"], "--min-floor"),
    ("compare-min-floor-one", ["compare", "--min-floor", "1", "a", "b"], "--min-floor"),
    ("compare-min-floor-negative", ["compare", "--min-floor", "-0.1", "a", "b"], "--min-floor"),
    ("compare-gate-empty", ["compare", "--gate", "", "a", "b"], "--gate"),
    ("compare-gate-negative", ["compare", "--gate", "p50:-5%", "a", "b"], "--gate"),
    ("compare-gate-unknown-metric", ["compare", "--gate", "p42:+5%", "a", "b"], "p42"),
    ("compare-gate-twice", ["compare", "--gate", "p50:+5%,p50:+6%", "a", "b"], "p50"),
    ("compare-config-missing", ["compare", "--config", "{tmp}/nope.yaml", "a", "b"], "nope.yaml"),
    ("compare-config-binary", ["compare", "--config", "{binary}", "a", "b"], "bin.yaml"),
    ("compare-config-utf16", ["compare", "--config", "{cfg}", "a", "b"], "cfg.yaml",
     "compare: {alpha: 0.05}\n".encode("utf-16")),
    ("compare-config-duplicate", ["compare", "--config", "{cfg}", "a", "b"], "duplicate key 'alpha'",
     "compare:\n  alpha: 0.05\n  alpha: 0.01\n"),
    ("compare-config-alpha-nan", ["compare", "--config", "{cfg}", "a", "b"], "compare.alpha",
     "compare: {alpha: .nan}\n"),
    ("compare-config-coverage-inf", ["compare", "--config", "{cfg}", "a", "b"], "coverage",
     "compare: {noise_floor: {coverage: .inf}}\n"),
    ("compare-config-resamples-huge", ["compare", "--config", "{cfg}", "a", "b"], "resamples",
     "compare: {bootstrap: {resamples: 1000000000000}}\n"),
    ("compare-config-sla-nan", ["compare", "--config", "{cfg}", "a", "b"], "thresholds",
     "compare: {sla: {thresholds: {'*': .nan}}}\n"),
    ("compare-config-unknown-key", ["compare", "--config", "{cfg}", "a", "b"], "gates",
     "compare: {gates: p50}\n"),
    ("compare-config-list", ["compare", "--config", "{cfg}", "a", "b"], "cfg.yaml", "- compare\n"),
    ("fleet-z-nan", ["fleet", "--z", "nan", "a"], "--z"),
    ("fleet-z-inf", ["fleet", "--z", "inf", "a"], "--z"),
    ("fleet-z-zero", ["fleet", "--z", "0", "a"], "--z"),
    ("fleet-config-z-nan", ["fleet", "--config", "{cfg}", "a"], "z_threshold", "fleet: {z_threshold: .nan}\n"),
    ("fleet-config-price-inf", ["fleet", "--config", "{cfg}", "a"], "price_per_device_hour",
     "fleet: {price_per_device_hour: .inf}\n"),
    ("fleet-no-run", ["fleet"], "RUN_OR_DIR"),
    ("env-sysroot-and-capture", ["env", "--sysroot", "{tmp}", "--capture", "{tmp}/c"], "--capture"),
    ("validate-devices-empty", ["validate", "--devices", ""], "--devices"),
    ("validate-suite-utf16", ["validate", "--suite", "{cfg}", "--out", "{tmp}/v"], "cfg.yaml", GOOD_SUITE.encode("utf-16")),
    ("validate-suite-timeout-nan", ["validate", "--suite", "{cfg}", "--out", "{tmp}/v"], "timeout_s",
     GOOD_SUITE.replace("timeout_s: 60", "timeout_s: .nan")),
]


@pytest.mark.parametrize("args,culprit,cfg", [pytest.param(c[1], c[2], c[3] if len(c) > 3 else None, id=c[0])
                                              for c in CLI])
def test_cli_misuse_is_one_line_exit_2(tmp_path, monkeypatch, args, culprit, cfg):
    (tmp_path / "results").mkdir()
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "suite.yaml").write_text(GOOD_SUITE)
    if cfg is not None:
        (tmp_path / "cfg.yaml").write_bytes(cfg if isinstance(cfg, bytes) else cfg.encode())
    subs = {"{tmp}": str(tmp_path), "{binary}": str(tmp_path / "bin.yaml"), "{cfg}": str(tmp_path / "cfg.yaml"),
            "{suite}": str(tmp_path / "suite.yaml")}
    resolved = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        resolved.append(a)
    if resolved[:1] == ["run"] and "--out" not in resolved:
        resolved += ["--out", str(tmp_path / "results")]
    line = check("CLI misuse", tmp_path, resolved, culprit, monkeypatch=monkeypatch)
    if "--help" in line:  # a usage error: the hint names the command
        assert f"'coherence {args[0]} --help'" in line or "'coherence --help'" in line


def test_cpu_ranks_above_the_planning_limit_is_refused(tmp_path, monkeypatch):
    """--cpu-ranks 1000 on a machine with 2 usable cores (a stand-in for the host
    facts, so the test holds on any core count)."""
    from harness import run_command

    real = run_command.host_facts
    monkeypatch.setattr(run_command, "host_facts", lambda env: {**real(env), "usable_cores": 2})
    (tmp_path / "results").mkdir()
    (tmp_path / "suite.yaml").write_text(GOOD_SUITE)
    line = check("CLI misuse", tmp_path, ["run", "--suite", str(tmp_path / "suite.yaml"), "--cpu-ranks", "1000",
                                          "--devices", "cpu", "--out", str(tmp_path / "results"), "-q"],
                 "--cpu-ranks 1000", monkeypatch=monkeypatch)
    assert "2 × 2 usable cores" in line


@pytest.mark.parametrize("args,culprit", [
    pytest.param(["run", "--timeout", "nan"], "--timeout", id="subprocess-run-timeout-nan"),
    pytest.param(["frobnicate"], "frobnicate", id="subprocess-no-such-command"),
])
def test_cli_misuse_in_a_real_process(tmp_path, args, culprit):
    """The console entry itself: the exit status and the stderr a shell sees."""
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    outcome = classify(proc.returncode, proc.stderr, False)
    COUNTS["CLI misuse"][outcome] += 1
    assert outcome == "one line, exit 2", proc.stderr
    assert culprit in proc.stderr
    assert f"'coherence {args[0]} --help'" in proc.stderr or "'coherence --help'" in proc.stderr
    assert snapshot(tmp_path) == before


# -- 3. corrupt run folders ----------------------------------------------------------------------
def _rewrite_json(name: str, change):
    def damage(run: Path) -> None:
        doc = json.loads((run / name).read_text())
        change(doc)
        (run / name).write_text(json.dumps(doc))
    return damage


def _write(name: str, data: bytes):
    def damage(run: Path) -> None:
        (run / name).write_bytes(data)
    return damage


def _truncate(name: str, keep: float = 0.5):
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def _remove(name: str):
    def damage(run: Path) -> None:
        (run / name).unlink()
    return damage


def _table(name: str, change):
    def damage(run: Path) -> None:
        df = pd.read_parquet(run / name)
        df = change(df)
        (run / name).unlink()
        df.to_parquet(run / name, index=False)
    return damage


def _set(doc: dict, key: str, value) -> None:
    doc[key] = value


def _del(doc: dict, key: str) -> None:
    doc.pop(key, None)


def _dir_instead(name: str):
    def damage(run: Path) -> None:
        (run / name).unlink()
        (run / name).mkdir()
    return damage


def _journal_line(text: str):
    def damage(run: Path) -> None:
        (run / "cases.jsonl").write_text(text)
        (run / "cases.parquet").unlink()
    return damage


RUN_DAMAGE = [
    # (id, damage, culprit in the line, commands that read the damaged file)
    ("manifest-missing", _remove("manifest.json"), ("manifest.json", "neither a run folder")),
    ("manifest-empty", _write("manifest.json", b""), "manifest.json"),
    ("manifest-not-json", _write("manifest.json", b"{not json"), "manifest.json"),
    ("manifest-binary", _write("manifest.json", bytes(range(256))), "manifest.json"),
    ("manifest-utf16", lambda r: (r / "manifest.json").write_bytes((r / "manifest.json").read_text().encode("utf-16")),
     "manifest.json"),
    ("manifest-list", _write("manifest.json", b"[1, 2, 3]"), "manifest.json"),
    ("manifest-truncated", _truncate("manifest.json"), "manifest.json"),
    ("manifest-is-directory", _dir_instead("manifest.json"), "manifest.json"),
    ("manifest-schema-string", _rewrite_json("manifest.json", lambda d: _set(d, "schema_version", "2")), "schema_version"),
    ("manifest-schema-bool", _rewrite_json("manifest.json", lambda d: _set(d, "schema_version", True)), "schema_version"),
    ("manifest-schema-newer", _rewrite_json("manifest.json", lambda d: _set(d, "schema_version", 999)), "schema"),
    ("manifest-no-schema", _rewrite_json("manifest.json", lambda d: _del(d, "schema_version")), "schema_version"),
    ("manifest-run-id-number", _rewrite_json("manifest.json", lambda d: _set(d, "run_id", 5)), "run_id"),
    ("manifest-status-int", _rewrite_json("manifest.json", lambda d: _set(d, "status", 1)), "status"),
    ("manifest-config-string", _rewrite_json("manifest.json", lambda d: _set(d, "config", "quick")), "config"),
    ("manifest-indicators-string",
     _rewrite_json("manifest.json", lambda d: _set(d["config"]["resolved"], "indicators",
                                                   {"thresholds": {"mode1.drift": "high"}})), "mode1.drift"),
    ("cases-parquet-garbage", _write("cases.parquet", b"PAR1 this is not parquet"), "cases.parquet"),
    ("cases-parquet-empty-file", _write("cases.parquet", b""), "cases.parquet"),
    ("cases-parquet-truncated", _truncate("cases.parquet"), "cases.parquet"),
    ("cases-parquet-directory", _dir_instead("cases.parquet"), "cases.parquet"),
    ("cases-p50-string", _table("cases.parquet", lambda df: df.assign(p50_s="fast")), "p50_s"),
    ("cases-status-int", _table("cases.parquet", lambda df: df.assign(status=1)), "status"),
    ("cases-duplicate-ids", _table("cases.parquet", lambda df: pd.concat([df, df])), ("case_id", "case id")),
    ("cases-no-case-id", _table("cases.parquet", lambda df: df.drop(columns=["case_id"])), "case_id"),
    ("cases-case-id-int", _table("cases.parquet", lambda df: df.assign(case_id=range(len(df)))), "case_id"),
    ("cases-other-table", _table("cases.parquet", lambda df: pd.DataFrame({"x": [1, 2]})), "cases.parquet"),
    ("samples-garbage", _write("samples.parquet", b"garbage"), "samples.parquet"),
    ("samples-truncated", _truncate("samples.parquet"), "samples.parquet"),
    ("samples-duration-string", _table("samples.parquet", lambda df: df.assign(duration_s="x")), "duration_s"),
    ("samples-no-duration", _table("samples.parquet", lambda df: df.drop(columns=["duration_s"])), "duration_s"),
    ("samples-no-case-id", _table("samples.parquet", lambda df: df.drop(columns=["case_id"])), "case_id"),
    ("telemetry-garbage", _write("telemetry.parquet", b"garbage"), "telemetry.parquet"),
    ("telemetry-value-string", _table("telemetry.parquet", lambda df: df.assign(value="hot")), "value"),
    ("indicators-not-json", _write("indicators.json", b"{\"mode1\": "), "indicators.json"),
    ("indicators-list", _write("indicators.json", b"[]"), "indicators.json"),
    ("indicators-mode-string", _rewrite_json("indicators.json", lambda d: _set(d, "mode1", "fine")), "mode1"),
    ("indicators-summary-string", _rewrite_json("indicators.json", lambda d: _set(d, "summary", {"ok": "many"})),
     "summary"),
    ("indicators-binary", _write("indicators.json", bytes(range(256))), "indicators.json"),
    ("journal-line-not-a-row", _journal_line("[1, 2, 3]\n"), "cases.jsonl"),
    ("journal-line-number", _journal_line("42\n"), "cases.jsonl"),
    ("journal-row-without-id", _journal_line('{"status": "ok"}\n'), "cases.jsonl"),
]

# Per damaged file, three commands that read it (a command that never opens a file has
# nothing to refuse: show reads no samples). `fleet` is left out on purpose: it lists a
# node it cannot load with the reason and goes on with the others (harness.fleet.
# load_nodes), so one broken node of a thousand does not hide the fleet.
RUN_COMMANDS = {
    "manifest": ("show", "export", "compare"),
    "cases": ("show", "export", "report"),
    "journal": ("show", "export", "compare"),
    "samples": ("export", "collect", "compare"),
    "telemetry": ("export", "collect", "compare"),
    "indicators": ("show", "export", "compare"),
    "overrides": ("collect",),
}


def _kind(damage_id: str) -> str:
    # The suite's indicators overrides, replayed from the manifest, are read by collect.
    return "overrides" if damage_id.startswith("manifest-indicators") else damage_id.split("-")[0]


def _run_args(command: str, run: Path, base: Path, root: Path) -> list[str]:
    if command == "show":
        return ["show", str(run)]
    if command == "export":
        return ["export", str(run), "-o", str(root / "out.jsonl")]
    if command == "collect":
        return ["collect", str(run), "--quiet"]
    if command == "report":
        return ["report", str(run), "-o", str(root / "r.html")]
    if command == "compare":
        return ["compare", str(base), str(run), "--json"]
    if command == "fleet":
        return ["fleet", str(base), str(run), "--json"]
    raise AssertionError(command)


RUN_CASES = [pytest.param(damage, culprit, cmd, id=f"{i}-{cmd}")
             for i, damage, culprit in RUN_DAMAGE for cmd in RUN_COMMANDS[_kind(i)]]


@pytest.mark.parametrize("damage,culprit,command", RUN_CASES)
def test_corrupt_run_folder_is_one_line_exit_2(tmp_path, monkeypatch, made_runs, damage, culprit, command):
    base = _place(made_runs["complete"], tmp_path, "20000101-000000-base")
    run = _place(made_runs["complete"], tmp_path)
    damage(run)
    check("corrupt run folders", tmp_path, _run_args(command, run, base, tmp_path), culprit, run=run,
          monkeypatch=monkeypatch)


def test_the_undamaged_run_is_read_by_every_command(tmp_path, monkeypatch, made_runs):
    """The control: what the damage cases break works on the run as made."""
    base = _place(made_runs["complete"], tmp_path, "20000101-000000-base")
    run = _place(made_runs["complete"], tmp_path)
    monkeypatch.chdir(tmp_path)
    for command in ("show", "export", "collect", "compare", "fleet"):
        result = CliRunner().invoke(main, _run_args(command, run, base, tmp_path))
        assert result.exit_code in (0, 1) and result.exception is None or isinstance(result.exception, SystemExit), (
            command, result.stderr)
        assert "Traceback" not in result.stderr


# -- 4. --resume of corrupt partial runs ----------------------------------------------------------
def _manifest(change):
    return _rewrite_json("manifest.json", change)


def _suite_cfg(key: str, value):
    def change(doc: dict) -> None:
        doc["config"]["suite"][key] = value
    return _manifest(change)


def _config_key(key: str, value):
    def change(doc: dict) -> None:
        doc["config"][key] = value
    return _manifest(change)


RESUME_DAMAGE = [
    ("manifest-missing", _remove("manifest.json"), "manifest.json"),
    ("manifest-not-json", _write("manifest.json", b"{"), "manifest.json"),
    ("manifest-utf16", lambda r: (r / "manifest.json").write_bytes((r / "manifest.json").read_text().encode("utf-16")),
     "manifest.json"),
    ("manifest-list", _write("manifest.json", b"[]"), "manifest.json"),
    ("no-environment", _manifest(lambda d: _del(d, "environment")), "environment"),
    ("no-config", _manifest(lambda d: _del(d, "config")), "config"),
    ("no-suite-in-config", _manifest(lambda d: _del(d["config"], "suite")), "suite"),
    ("schema-newer", _manifest(lambda d: _set(d, "schema_version", 999)), "schema"),
    ("schema-bool", _manifest(lambda d: _set(d, "schema_version", True)), "schema_version"),
    ("already-complete", _manifest(lambda d: _set(d, "status", "complete")), "complete"),
    ("suite-timeout-nan", _suite_cfg("timeout_s", float("nan")), "timeout_s"),
    ("suite-timeout-inf", _suite_cfg("timeout_s", float("inf")), "timeout_s"),
    ("suite-timeout-1e300", _suite_cfg("timeout_s", 1e300), "timeout_s"),
    ("suite-group-timeout-nan", _suite_cfg("group_timeout_s", float("nan")), "group_timeout_s"),
    ("suite-budget-inf", _suite_cfg("timing", {"budget_s": float("inf")}), "budget_s"),
    ("suite-unknown-probe", _suite_cfg("probes", {"memory.kopy": {}}), "memory.kopy"),
    ("suite-plugin-missing", _suite_cfg("plugins", ["c17_no_such_plugin"]), "c17_no_such_plugin"),
    ("suite-indicators-string", _suite_cfg("indicators", {"thresholds": {"mode1.drift": "high"}}), "mode1.drift"),
    ("suite-nominal-npu", _suite_cfg("nominal", {"npu": {"memory_Bps": 1e12}}), "npu"),
    ("devices-not-here", _config_key("devices", ["cuda:999"]), "cuda:999"),
    ("backend-unknown", _config_key("backend", "tensorflow"), "tensorflow"),
    ("probe-filter-unknown", _config_key("probe_filter", ["gemm.cube"]), "gemm.cube"),
    ("cpu-ranks-huge", _config_key("cpu_ranks", 100000), "100000"),
    ("timeout-override-nan", _config_key("timeout_override_s", float("nan")), "timeout"),
    ("timeout-override-string", _config_key("timeout_override_s", "soon"), "timeout"),
    ("devices-string", _config_key("devices", "cpu:0"), "devices"),
    ("rounds-string", _manifest(lambda d: _set(d, "rounds", "three")), "rounds"),
    ("rounds-zero", _manifest(lambda d: _set(d, "rounds", 0)), "rounds"),
    ("round-seeds-string", _manifest(lambda d: _set(d, "round_seeds", "abc")), "round_seeds"),
    ("sessions-string", _manifest(lambda d: _set(d, "sessions", "yesterday")), "sessions"),
]


@pytest.mark.parametrize("damage,culprit", [pytest.param(d, c, id=i) for i, d, c in RESUME_DAMAGE])
def test_resume_of_a_corrupt_partial_run_is_one_line_exit_2(tmp_path, monkeypatch, made_runs, damage, culprit):
    monkeypatch.syspath_prepend(str(REPO))  # the run's plugin, tests.plugins.fault_probes
    run = _place(made_runs["partial"], tmp_path)
    damage(run)
    check("--resume of corrupt partial runs", tmp_path,
          ["run", "--resume", run.name, "--out", str(tmp_path / "results"), "-q", "--no-report"], culprit, run=run,
          env={"PYTHONPATH": str(REPO)}, monkeypatch=monkeypatch)


def test_the_bad_input_module_tries_at_least_150_inputs():
    """The issue asks for 150 generated bad inputs over the four categories."""
    per = {
        "malformed suites": len(SUITES) + len(SUITE_PATHS) + 1,
        "CLI misuse": len(CLI) + 1 + 2,
        "corrupt run folders": len(RUN_CASES),
        "--resume of corrupt partial runs": len(RESUME_DAMAGE),
    }
    assert all(n > 0 for n in per.values()) and sum(per.values()) >= 150, per


def test_ctrl_c_in_a_command_exits_130_in_one_line(monkeypatch):
    """KeyboardInterrupt inside any command: exit 130 (128 + SIGINT), one line; not
    click's exit 1, which coherence uses for 'a case failed'."""
    from harness import store

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "resolve_run", interrupted)
    result = CliRunner().invoke(main, ["show", "some-run"])
    assert result.exit_code == 130
    assert result.stderr.strip() == "coherence: interrupted (SIGINT)"


def test_gpu_world_size_above_the_device_count_is_skipped_with_its_reason():
    """GPU groups are limited by the devices selected (stand-in device dicts: no GPU needed)."""
    from harness import config, registry
    from harness.plan import plan

    registry.discover()
    suite = config.parse_suite({"name": "t", "probes": {"collective.all_reduce": {
        "params": {"size_bytes": [1024], "world_size": [2, 4]}}}}, "t.yaml")
    gpus = [{"id": f"cuda:{i}", "type": "cuda", "backend": "torch", "name": "NVIDIA H100 80GB HBM3"} for i in range(2)]
    cases = {c.world_size: c for c in plan(suite, suite.probes, gpus, "torch", {"usable_cores": 2})}
    assert cases[2].skip is None
    assert cases[4].skip == "needs 4 cuda devices, 2 selected"
