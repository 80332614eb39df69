"""The package's shape stays true: imports only point down the layers of README's "Layout", no import cycles,
reading a recipe never imports torch, and no file points outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dscompress"

# Lowest first. A module may import its own layer or a lower one; compress/ and export/ never import each other.
LAYERS = [
    ("version", "schema", "errors", "atomic", "yamlpaths", "quant", "artifact"),
    ("calibrate", "models"),
    ("gates", "context"),
    ("compress", "export"),
    ("registry",),
    ("recipe",),
    ("runner", "plan", "report", "report_html", "evaluate"),
    ("cli", ""),  # "" is the package root (dscompress.run)
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if top in names)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """dscompress modules `path` imports at run time (anywhere in the file; TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dscompress"):
            names = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("dscompress")]
        else:
            continue
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_module_has_a_layer():
    assert all(layer_of(m) >= 0 for m in modules())


def test_imports_only_point_down():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if target == "dscompress":  # the package root is only a namespace for its children
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} -> {target}")
            sides = {(module.split(".") + [""])[1], (target.split(".") + [""])[1]}
            if sides == {"compress", "export"}:
                upward.append(f"{module} -> {target} (compress and export stand side by side)")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    edges = {m: {t for t in ts if t != "dscompress"} for m, ts in graph().items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The walker is not blind: an import inside a function body counts (it would hide a cycle otherwise)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from dscompress.runner import Runner\n")
    assert imports(path, {"dscompress.runner": path}) == {"dscompress.runner"}


@pytest.mark.parametrize(
    "code",
    [
        "from dscompress.recipe import Recipe; Recipe.model_json_schema()",
        "from dscompress.cli import app",
        "from pathlib import Path; from dscompress.recipe import load_recipe; "
        "load_recipe(Path('recipes/smollm2-int4-rtn.yaml'))",
    ],
)
def test_reading_a_recipe_does_not_import_torch(code):
    check = f"import sys; {code}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)


def test_schema_and_a_bad_recipe_do_not_import_torch(tmp_path):
    """`dscompress schema`, and `validate` of a recipe whose problems need no model shapes, stay torch-free."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: tiny:llama}\nstages:\n  - rtn: {bits: 5}\n")
    probe = (
        "import sys, runpy; sys.argv = ['dscompress', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('dscompress.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)\n"
    )
    for args, code in ((["schema"], 0), (["validate", str(bad)], 2)):
        out = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, capture_output=True, text=True)
        assert out.stdout.strip().splitlines()[-1] == f"NO-TORCH {code}", out.stdout + out.stderr


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    outside = "../" + "shared"  # split, so this file does not match itself
    hits = [f for f in tracked.split() if (REPO / f).is_file() and outside in (REPO / f).read_text(errors="ignore")]
    assert not hits, f"files that refer to a path outside the repository: {hits}"
