"""The layering, checked from the source with `ast` so it cannot rot: each layer imports only from the layers
below it (and from its own package within its layer), module imports form no cycle, and an import inside a
function is allowed only for a heavy optional dependency, with a comment saying so."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("guard", "detectors", "watermark", "eval")
# (module prefix, layer); the longest matching prefix wins
LAYERS = [
    ("guard.teacher", 1), ("guard.hf_teacher", 1), ("guard.openai_teacher", 1), ("guard.load", 1), ("guard.reasoning", 1), ("guard.prompts", 1), ("guard.pretrained", 1),
    ("guard.redaction", 2), ("watermark", 2), ("detectors", 2),
    ("guard.defenses", 3), ("guard.monitored", 3), ("guard.audit", 3),
    ("guard.gateway", 3),  # the whole package: wire types, auth, limits, billing, streaming, routes, stores, admin
    ("eval", 4), ("eval.gateway_study", 4),
    ("guard.cli", 5),
]


def layer(module: str) -> int:
    matches = [(len(prefix), n) for prefix, n in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer: add it to LAYERS (and to README's Architecture section)")
    return max(matches)[1]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.read_text().strip():
                continue  # an empty package marker
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def project_imports(path: Path) -> list[tuple[ast.AST, str, bool]]:
    """(node, imported project module, whether the import sits inside a function)."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node, name, id(node) in local) for name in names]
    return found


def test_every_module_has_a_layer():
    for module in modules():
        layer(module)


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_only_go_down(module):
    path = modules()[module]
    for node, imported, _ in project_imports(path):
        if imported.split(".")[0] not in PACKAGES:
            continue
        mine, theirs = layer(module), layer(imported)
        same_package = imported.split(".")[0] == module.split(".")[0]
        assert theirs < mine or (theirs == mine and same_package), (
            f"{path.relative_to(ROOT)}:{node.lineno}: {module} (layer {mine}) imports {imported} (layer {theirs})")


def test_no_import_cycles():
    found = modules()
    graph = {m: {i for _, i, local in project_imports(p) if not local and i in found and i != m}
             for m, p in found.items()}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for nxt in graph[module]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_imports_inside_functions_are_for_heavy_optional_dependencies():
    for module, path in modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in (n for n in ast.walk(function) if isinstance(n, (ast.Import, ast.ImportFrom))):
                first = node.lineno - 1  # the comment may head a run of imports
                while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                    first -= 1
                said = " ".join(lines[max(0, first - 1): node.end_lineno]).lower()
                assert "optional" in said, (f"{path.relative_to(ROOT)}:{node.lineno}: an import inside a function "
                                            "is only for a heavy optional dependency, with a comment saying so")


def test_the_checks_catch_planted_violations(tmp_path, monkeypatch):
    """Each check above fails on a tree that breaks its rule, so none of them passes vacuously."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "guard" / "teacher.py").write_text("from eval.attack import evaluate\n")
    (tmp_path / "eval" / "attack.py").write_text("from eval.harvest import Harvester\n")
    (tmp_path / "eval" / "harvest.py").write_text("from eval.attack import evaluate\n"
                                                  "def f():\n    import eval.attack\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports eval.attack"):
        test_imports_only_go_down("guard.teacher")
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="only for a heavy optional dependency"):
        test_imports_inside_functions_are_for_heavy_optional_dependencies()
