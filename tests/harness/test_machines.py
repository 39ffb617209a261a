"""The machine corpus: `coherence env --sysroot <snapshot> --json` matches each expected.yaml.

Format: tests/fixtures/machines/README.md. Only the keys present in expected.yaml are
compared; floats with rel tol 1e-6; {value, source} facts are unwrapped to their value.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from harness.cli import main

MACHINES = Path(__file__).resolve().parent.parent / "fixtures" / "machines"
SNAPSHOTS = sorted(p.name for p in MACHINES.iterdir() if (p / "expected.yaml").is_file()) if MACHINES.is_dir() else []


def unwrap(node):
    if isinstance(node, dict) and set(node) == {"value", "source"}:
        return node["value"]
    return node


def view(doc: dict, expected: dict) -> dict:
    """The parts of the document that expected.yaml's keys name (README table)."""
    out: dict = {}
    virt = doc.get("virtualization") or {}
    layers = virt.get("layers") or []
    out["virtualization"] = {
        "summary": virt.get("summary"),
        "hypervisor": [e["kind"] for e in layers if e.get("layer") == "hypervisor"],
        "container": [e["kind"] for e in layers if e.get("layer") in ("sandbox", "container")],
    }
    cpu = {k: unwrap(v) for k, v in (doc.get("cpu") or {}).items()}
    cpu["arch"] = unwrap((doc.get("os") or {}).get("arch"))
    cpu["cgroup_memory_limit_bytes"] = unwrap((doc.get("memory") or {}).get("cgroup_limit_bytes"))
    out["cpu"] = cpu
    nominal = dict(doc.get("nominal") or {})
    if "cpu:0" in nominal:
        nominal["cpu"] = nominal["cpu:0"]
    out["nominal"] = nominal
    for key in expected:
        if key not in out and key != "source":
            out[key] = doc.get(key)
    return out


def compare(expected, actual, path: str, errors: list[str]) -> None:
    actual = unwrap(actual)
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            errors.append(f"{path}: expected a mapping, got {actual!r}")
            return
        for k, v in expected.items():
            if k not in actual:
                errors.append(f"{path}.{k}: missing (have {sorted(actual)[:12]})")
            else:
                compare(v, actual[k], f"{path}.{k}", errors)
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            errors.append(f"{path}: expected {expected!r}, got {actual!r}")
            return
        for i, (e, a) in enumerate(zip(expected, actual)):
            compare(e, a, f"{path}[{i}]", errors)
    elif isinstance(expected, float) or (isinstance(expected, int) and isinstance(actual, float)
                                         and not isinstance(expected, bool)):
        if not isinstance(actual, (int, float)) or isinstance(actual, bool) or \
                not math.isclose(float(expected), float(actual), rel_tol=1e-6):
            errors.append(f"{path}: expected {expected!r}, got {actual!r}")
    elif expected != actual:
        errors.append(f"{path}: expected {expected!r}, got {actual!r}")


def fingerprint(root: Path) -> dict:
    result = CliRunner().invoke(main, ["env", "--sysroot", str(root), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_corpus_is_large_enough():
    assert len(SNAPSHOTS) >= 20, SNAPSHOTS


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_snapshot_matches_expected(name):
    root = MACHINES / name
    expected = yaml.safe_load((root / "expected.yaml").read_text())
    assert isinstance(expected, dict) and expected.get("source"), f"{name}/expected.yaml needs a source line"
    doc = fingerprint(root)
    errors: list[str] = []
    body = {k: v for k, v in expected.items() if k != "source"}
    compare(body, view(doc, expected), name, errors)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_snapshot_is_small_and_has_no_sparse_giants(name):
    total = 0
    for dirpath, _dirs, files in os.walk(MACHINES / name):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            assert st.st_size < 1 << 20, f"{dirpath}/{f}: {st.st_size} bytes"
            total += st.st_size
    assert total < 1 << 20


def test_compare_catches_differences():
    errors: list[str] = []
    compare({"a": 1.0, "b": [1, 2], "c": {"d": "x"}},
            {"a": {"value": 1.1, "source": "s"}, "b": [1], "c": {"d": "y"}}, "t", errors)
    assert len(errors) == 3
    ok: list[str] = []
    compare({"a": 3.2e9, "n": None}, {"a": 3.2e9 * (1 + 1e-9), "n": {"value": None, "source": "why"}}, "t", ok)
    assert ok == []
