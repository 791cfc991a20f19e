"""The project's structure: a lean core, arrows that point one way, documents that name real code."""

import ast
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_without_flax_optax_orbax_or_generation():
    code = ("import jaxroute.core, sys; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('orbax', 'flax', 'optax', 'generation', 'launch')); print(bad); assert not bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_core_public_api_is_explicit_and_has_no_module_name_clash():
    core = importlib.import_module("jaxroute.core")
    assert core.__all__ == sorted(core.__all__, key=str.lower) or len(set(core.__all__)) == len(
        core.__all__)
    for name in core.__all__:
        obj = getattr(core, name)
        assert not isinstance(obj, types.ModuleType), f"jaxroute.core.{name} is a module"
        assert callable(obj), name
    assert "vtrace_targets" in core.__all__ and "cpo_step" in core.__all__


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("jaxroute/core", ("flax", "optax", "orbax", "generation", "launch", "jaxroute.networks",
                       "jaxroute.tcpo", "jaxroute.trainer", "jaxroute.trace", "jaxroute.env")),
    ("jaxroute", ("generation", "launch")),
    ("generation", ("launch",)),
])
def test_dependency_arrows_point_one_way(package, forbidden):
    for path in sorted((ROOT / package).rglob("*.py")):
        for mod in _imports(path):
            assert not any(mod == f or mod.startswith(f + ".") for f in forbidden), \
                f"{path.relative_to(ROOT)} imports {mod}"


def test_environment_does_not_import_a_learner_and_writers_not_the_trace_format():
    assert "jaxroute.tcpo" not in _imports(ROOT / "jaxroute" / "env.py")
    for path in [ROOT / "jaxroute" / "export.py", *sorted((ROOT / "launch").glob("*.py"))]:
        src = path.read_text()
        assert "from jaxroute.trace import atomic_write_text" not in src, path


def test_tests_never_import_launch_scripts():
    for path in sorted((ROOT / "tests").glob("*.py")):
        mods = _imports(path)
        assert not any(m == "launch" or m.startswith("launch.") for m in mods), path


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_function_named_in_the_design_exists():
    text = (ROOT / "docs" / "design.md").read_text()
    names = sorted(set(re.findall(r"`((?:jaxroute|generation)\.[A-Za-z_][\w.]*)`", text)))
    assert len(names) >= 20
    for name in names:
        _resolve(name)  # raises if a renamed or deleted function is still documented


def test_package_lists_importable_modules():
    pkg = importlib.import_module("jaxroute")
    for name in pkg.__all__:
        importlib.import_module(f"jaxroute.{name}")


def test_decision_log_is_numbered_once_and_in_order():
    nums = [int(n) for n in re.findall(r"^(\d+)\. \*\*", (ROOT / "docs" / "decisions.md")
                                       .read_text(), flags=re.M)]
    assert nums == list(range(1, len(nums) + 1)), nums
