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
    """Every module `path` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module_graph() -> dict[str, set[str]]:
    """Project module → the project modules it imports (function-level imports included; a
    `from package import module` counts as the module)."""
    files = {}
    for pkg in ("jaxroute", "generation", "launch"):
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for mod in _imports(path):
            while mod and mod not in files:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):
                deps.add(mod)
        graph[name] = deps
    return graph


def test_the_import_graph_has_no_circle():
    """No module reaches itself through imports (function-level ones too); the circles are
    printed when one appears."""
    graph = _module_graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import arrows, circles: "
          f"{circles or 'none'}")
    assert not circles


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


def _decisions() -> dict[int, str]:
    text = (ROOT / "docs" / "decisions.md").read_text()
    parts = re.split(r"^(\d+)\. \*\*", text, flags=re.M)
    return {int(n): body.split("\n\n")[0].split("\n## ")[0] for n, body in
            zip(parts[1::2], parts[2::2], strict=True)}


def test_decision_log_is_numbered_once_and_in_order():
    nums = [int(n) for n in re.findall(r"^(\d+)\. \*\*", (ROOT / "docs" / "decisions.md")
                                       .read_text(), flags=re.M)]
    assert nums == list(range(1, len(nums) + 1)), nums


def _repository_texts():
    for pattern in ("jaxroute/**/*.py", "generation/**/*.py", "launch/*.py", "tests/*.py",
                    "docs/*.md", "*.md", ".ci/run", "pyproject.toml"):
        yield from sorted(ROOT.glob(pattern))


def test_every_decision_cited_exists_and_superseded_ones_say_by_which():
    log = _decisions()
    for path in _repository_texts():
        for m in re.finditer(r"\bdecisions? ((?:\d+(?:[–-]\d+)?(?:, | and )?)+)",
                             path.read_text()):
            for a, b in re.findall(r"(\d+)(?:[–-](\d+))?", m.group(1)):
                for n in range(int(a), int(b or a) + 1):
                    assert n == 0 or n in log, f"{path.relative_to(ROOT)} cites decision {n}"
    for n, body in log.items():
        assert len(body.strip().splitlines()) <= 10, f"decision {n} is an essay"
        for by in re.findall(r"Superseded by (\d+)", body):
            assert int(by) in log and int(by) > n, f"decision {n}: superseded by {by}?"


def test_every_function_named_in_the_decision_log_exists():
    text = (ROOT / "docs" / "decisions.md").read_text()
    rooms = ("backends", "traces", "tinylm", "live", "serving")
    prefixes = ("", "jaxroute.", "jaxroute.core.", "generation.",
                *(f"generation.{r}." for r in rooms))
    roots = {p.stem for d in ("jaxroute", "jaxroute/core", "generation", "launch",
                              *(f"generation/{r}" for r in rooms)) for p in (ROOT / d).glob("*.py")}
    roots |= {"core", "jaxroute", "generation", "launch"}
    names = sorted({n for n in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]\w*)+)`", text)
                    if n.split(".")[0] in roots})
    assert len(names) >= 15
    for name in names:
        if name.startswith("launch."):  # entry points: a module file (importing defines flags)
            assert (ROOT / "launch" / f"{name.split('.')[1]}.py").exists(), name
            continue
        for prefix in prefixes:
            try:
                _resolve(prefix + name)
                break
            except (ImportError, AttributeError):
                continue
        else:
            raise AssertionError(f"docs/decisions.md names `{name}`, which does not exist")


def test_no_text_refers_to_an_issue_number():
    """Issue numbers mean nothing to a reader of the repository: say the decision instead."""
    for path in _repository_texts():
        for line in path.read_text().splitlines():
            assert not re.search(r"\b[Ii]ssues? #?\d+", line), f"{path.relative_to(ROOT)}: {line}"


# The rooms of `generation` and the rooms each may import (decision 89). A module outside
# every room, or an arrow not listed, fails: the layout is decided here, not by accident.
ROOMS = {
    "backends": set(),
    "traces": {"backends"},
    "tinylm": {"backends", "traces"},
    "registry": {"backends", "tinylm"},
    "live": {"backends", "traces", "tinylm", "registry"},
    "serving": {"backends", "traces", "tinylm", "registry", "live"},
    "main_job": {"backends", "traces", "tinylm", "registry", "live"},
    "fanout": {"backends", "traces", "registry", "main_job"},
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "generation" and len(parts) > 1 else None


def test_generation_is_laid_out_by_room_and_arrows_between_rooms_are_the_allowed_ones():
    graph = _module_graph()
    arrows = sorted({(_room(a), _room(b)) for a, deps in graph.items() for b in deps
                     if _room(a) and _room(b) and _room(a) != _room(b)})
    print("rooms:", {r: sorted({b for a, b in arrows if a == r}) for r in ROOMS})
    assert {_room(m) for m in graph if _room(m)} <= set(ROOMS), "a module outside every room"
    for a, b in arrows:
        assert b in ROOMS[a], f"generation.{a} imports generation.{b}"
    for room in ROOMS:  # each room says what it holds and what it may import
        init = ROOT / "generation" / room / "__init__.py"
        if init.exists():
            assert "May import" in init.read_text(), init


def test_the_models_package_holds_models():
    """No loop between `generation.tinylm` and the rest of `generation` (imports inside
    functions counted): the main job's pipeline and the tiny server live outside it."""
    graph = _module_graph()
    importers = {_room(a) for a, deps in graph.items() for b in deps
                 if _room(b) == "tinylm" and _room(a) != "tinylm"}
    imported = {_room(b) for a, deps in graph.items() if _room(a) == "tinylm" for b in deps
                if _room(b) and _room(b) != "tinylm"}
    assert not importers & imported, importers & imported


def test_training_sits_below_evaluation_and_the_guarantee_below_training():
    graph = _module_graph()
    for m in ("jaxroute.learner", "jaxroute.trainer", "jaxroute.exact", "jaxroute.tcpo"):
        assert "jaxroute.evaluate" not in graph[m], m
    allowed = {"jaxroute.core", "jaxroute.env", "jaxroute.stats", "jaxroute.trace",
               "jaxroute.errors"}
    assert {d.removesuffix(".calibration") for d in graph["jaxroute.guarantee"]} <= allowed, \
        graph["jaxroute.guarantee"]


# Functions longer than this are split, unless they are kernels documented as one piece.
MAX_FUNCTION_LINES = 80
LONG_KERNELS: set[str] = set()


def test_no_function_is_longer_than_a_screen():
    long = []
    for pkg in ("jaxroute", "generation"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    name = f"{path.relative_to(ROOT)}:{node.name}"
                    if n > MAX_FUNCTION_LINES and name not in LONG_KERNELS:
                        long.append(f"{name} ({n} lines)")
    assert not long, long
