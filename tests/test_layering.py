"""The package's imports run one way: the graph of fastattn modules importing fastattn modules
(module-level and function-level imports, and module names handed to importlib as strings) has
no cycle, so every module sits in a layer above everything it imports."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted((ROOT / "fastattn").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[:2] == ("fastattn", "kernels"):
            continue  # the source-tree stand-in for the installed fastattn.kernels
        parts = list(relative.with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["fastattn", *parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(name: str, path: Path, is_package: bool, modules) -> set[str]:
    def known(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    tree = ast.parse(path.read_text())
    # a module that hands a computed name to importlib.import_module / __import__ may import any
    # module named by a string in it (a table of "pkg.module" strings, say)
    uses_importlib = any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
                         in ("import_module", "__import__") for node in ast.walk(tree))
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
        elif uses_importlib and isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.split(":")[0] in modules:  # "pkg.module" or "pkg.module:attr"
                targets.add(node.value.split(":")[0])
    return {t for t in map(known, targets) if t and t != name and t.startswith("fastattn")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, trail = {}, []

    def visit(node):
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_fastattn_imports_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}
    assert len(graph) > 30 and graph["fastattn.functional"] >= {"fastattn.dispatch", "fastattn.backends"}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
