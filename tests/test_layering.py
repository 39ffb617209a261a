"""The import graph of harness/ and probes/: no cycles, and imports run one way.

Every module is parsed (not imported) and every import statement counts, those inside
functions included: a function-level import is still a dependency, only a later one.
``from pkg import name`` is an edge to ``pkg.name`` where that is a module, else to
``pkg``. The import a package's ``__init__`` makes of its own modules is the only
edge a child's import of its parent package would otherwise close into a cycle, so
implicit parent-package imports are not edges.

The direction (docs/DESIGN.md, "Layout"): backend kernels (probes/torch/,
probes/jax/) -> specs (probes/*.py) -> harness. harness/ imports no probe; a spec
imports no kernel module and no framework; one backend's kernels import no other
backend's.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "probes")
FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "pynvml")
BACKEND_PACKAGES = ("probes.torch", "probes.jax")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) for every import in the module: project
    modules resolved as described above, other names as their top-level package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # module-level `if TYPE_CHECKING:` / try blocks are module level too
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name if alias.name in modules else alias.name.split(".")[0], node.lineno, at_top))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.append((full if full in modules else (target if target in modules else target.split(".")[0]),
                              node.lineno, at_top))
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    modules = project_modules()
    names = set(modules)
    raw = {name: imports_of(name, path, names) for name, path in modules.items()}
    edges = {name: {target for target, _, _ in found if target in names and target != name} for name, found in raw.items()}
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _path(edges: dict[str, set[str]], component: list[str]) -> str:
    """One cycle through the component, as ``a -> b -> a``, for the failure message."""
    members = set(component)
    start = component[0]
    trail, node = [start], start
    seen = {start}
    while True:
        node = sorted(t for t in edges[node] if t in members)[0]
        trail.append(node)
        if node in seen:
            return " -> ".join(trail[trail.index(node):])
        seen.add(node)


def test_the_finder_sees_a_cycle_through_a_function_level_import():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert _path(edges, ["a", "b", "c"]) == "a -> b -> c -> a"
    tree_module = "def f():\n    from harness import registry\n"
    path = REPO / "tests" / "_layering_probe.py"
    path.write_text(tree_module)
    try:
        (found,) = imports_of("harness.zz", path, {"harness.registry"})
        assert found == ("harness.registry", 2, False)
    finally:
        path.unlink()


def test_harness_and_probes_have_no_import_cycle():
    edges, _ = graph()
    assert len(edges) > 60  # every module was parsed
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(_path(edges, c) for c in found)


def test_imports_run_one_way():
    """kernels -> specs -> harness: harness imports no probe, a spec no kernel module
    and no framework, a backend's kernels no other backend's."""
    _, raw = graph()
    wrong = []
    for name, found in raw.items():
        for target, line, at_top in found:
            where = f"{name}:{line} imports {target}"
            if name.startswith("harness") and target.startswith("probes"):
                wrong.append(f"{where} (harness imports no probe)")
            backend = next((b for b in BACKEND_PACKAGES if name == b or name.startswith(b + ".")), None)
            if name.startswith("probes") and backend is None:
                if target.startswith(BACKEND_PACKAGES):
                    wrong.append(f"{where} (a spec imports no kernel module)")
                if target in FRAMEWORKS:
                    wrong.append(f"{where} (a spec imports no framework)")
            if backend is not None:
                other = [b for b in BACKEND_PACKAGES if b != backend]
                if target.startswith(tuple(other)):
                    wrong.append(f"{where} (one backend's kernels import no other backend's)")
                if target in FRAMEWORKS and at_top:
                    wrong.append(f"{where} at module level (frameworks are imported lazily)")
    assert not wrong, "\n".join(wrong)


def test_every_shipped_probe_has_a_torch_kernel_and_specs_import_no_framework():
    """Importing every spec module loads no framework; each shipped probe has a torch
    kernel (the reference backend)."""
    import subprocess

    code = (
        "import sys, importlib\n"
        "from importlib.metadata import entry_points\n"
        "specs = [ep.value for ep in entry_points(group='coherence.probes') if ep.value.count('.') == 1 "
        "and ep.value not in ('probes.torch', 'probes.jax')]\n"
        "for m in specs: importlib.import_module(m)\n"
        "print(sorted(f for f in ('torch', 'jax', 'jaxlib') if f in sys.modules))\n"
        "import probes.torch, probes.jax\n"
        "from harness import registry\n"
        "probes_ = registry.discover()\n"
        "print(sorted(n for n, c in probes_.items() if 'torch' not in registry.backends_of(c)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    loaded, without_torch = proc.stdout.splitlines()
    assert loaded == "[]"
    assert without_torch == "[]"
