from __future__ import annotations

import pytest

from harness import registry
from harness.errors import UserError
from harness.registry import Param, Probe, Work


def test_discovery_finds_the_shipped_probes_through_entry_points():
    probes = registry.discover()
    assert {"memory.copy", "memory.scale", "memory.add", "memory.triad", "gemm.square", "gemm.shaped",
            "overhead.timer", "overhead.launch"} <= set(probes)
    for cls in probes.values():
        assert cls.family in registry.FAMILIES and registry.backends_of(cls) and cls.ranks >= 0


def test_case_id_is_readable_and_ordered_by_declaration():
    assert registry.case_id("gemm.square", {"n": 1024, "dtype": "bf16"}, "cuda:0") == "gemm.square[n=1024,dtype=bf16]@cuda:0"
    assert registry.case_id("x.y", {"s": 2.0}, "cpu:0") == "x.y[s=2]@cpu:0"


class Demo(Probe):
    name = "demo.p"
    family = "memory"
    params = {"n": Param(default=(1, 2), type=int, minimum=1), "mode": Param(default=("a",), type=str, choices=("a", "b"))}

    def work(self, params, device_info):
        return Work(flops=params["n"], bytes=2 * params["n"])


def test_grid_defaults_overrides_and_expansion():
    grid = Demo.validate_params({"mode": ["a", "b"]}, "where")
    assert grid == {"n": [1, 2], "mode": ["a", "b"]}
    assert Demo.expand(grid) == [{"n": 1, "mode": "a"}, {"n": 1, "mode": "b"}, {"n": 2, "mode": "a"}, {"n": 2, "mode": "b"}]
    assert Demo.validate_params({"n": 5}, "w") == {"n": [5], "mode": ["a"]}


@pytest.mark.parametrize("over,msg", [
    ({"m": [1]}, "unknown parameter 'm'"),
    ({"n": [True]}, "expected int"),
    ({"n": [0]}, "below the minimum"),
    ({"mode": ["c"]}, "not one of a, b"),
    ({"n": []}, "empty list"),
])
def test_grid_validation(over, msg):
    with pytest.raises(UserError, match=msg):
        Demo.validate_params(over, "where")


def test_work_model_intensity():
    assert Work(flops=8, bytes=2).arithmetic_intensity == 4
    assert Work().arithmetic_intensity is None


def test_register_rejects_unknown_family_and_duplicates():
    class Bad(Probe):
        name = "bad.x"
        family = "astrology"

    with pytest.raises(TypeError, match="unknown family"):
        registry.register(Bad)

    class Dup(Probe):
        name = "memory.triad"
        family = "memory"

    registry.discover()
    with pytest.raises(TypeError, match="registered twice"):
        registry.register(Dup)
