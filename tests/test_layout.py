"""The import graph: no cycles, nothing imports upward, and the layers the README describes."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "puzzlenas"

# Higher layers may import lower ones, never the reverse (imports inside functions included).
LAYERS = {"cli": 4, "pipeline": 3, "stages": 2, "config": 1}  # everything else (method code, model/,
# data/, eval/, sections, checkpoint, dist): layer 0


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported puzzlenas module, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, ast.If)
                                        for n in stmt.body}  # `if TYPE_CHECKING:` bodies count as top
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(n, id(node) in top) for n in names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            found += [(m, id(node) in top) for m in mods if m and m.split(".")[0] == "puzzlenas"]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_nothing_imports_upward():
    bad = [(m, t) for m, edges in graph().items() for t, _ in edges if layer(t) > layer(m)]
    assert not bad, f"upward imports (module -> imported): {bad}"


def test_stage_modules_import_no_method_code_at_module_level():
    """Stage modules stay light (the CLI's --help imports them all): method code inside run()."""
    allowed = ("puzzlenas.stages", "puzzlenas.checkpoint", "puzzlenas.sections", "puzzlenas.config",
               "puzzlenas.integrity")  # torch-free: DONE checksums, the run lock
    for m, edges in graph().items():
        if m.startswith("puzzlenas.stages"):
            heavy = [t for t, top in edges if top and not t.startswith(allowed)]
            assert not heavy, (m, heavy)


def test_no_import_cycles_at_module_level():
    edges = {m: {t for t, top in e if top} for m, e in graph().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, t])}")
            if t in edges and not state.get(t):
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [])
