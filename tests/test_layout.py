"""The package's shape: no import cycle, the engine layers never read the config, and tasks
use the engine's public API only."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flashmoe"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the flashmoe modules it imports at module level (not inside functions)."""
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for dep in names:
                while dep and dep not in mods:
                    dep = dep.rpartition(".")[0]
                if dep and dep != name:
                    deps.add(dep)
        graph[name] = deps
    return graph


def test_no_module_level_import_cycle() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in graph[node]:
            visit(dep, path + [node])
        done.add(node)

    for node in graph:
        visit(node, [])


def test_engine_layers_do_not_read_the_config() -> None:
    for folder in ("runtime", "stages", "engine", "kernels", "models"):
        for path in (PKG / folder).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"\bflashmoe\.config\b|\bomegaconf\b|\bhydra\b", text), path


def test_tasks_set_no_engine_attributes() -> None:
    """No `engine.x = ...` in tasks, and no reaching into the engine's collaborators."""
    touch = re.compile(r"\b(engine|session)\.(pipeline|fetch|pools|store|io|worker|resident)\b")
    for path in list((PKG / "tasks").rglob("*.py")) + [PKG / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                while isinstance(t, (ast.Attribute, ast.Subscript)):
                    t = t.value
                    assert not (isinstance(t, ast.Name) and t.id in ("engine", "session")), \
                        f"{path}:{node.lineno} sets an engine attribute"
        assert not touch.search(path.read_text()), (path, touch.search(path.read_text()))


def test_yaml_comments_cite_files_that_exist() -> None:
    root = PKG.parent
    for path in (root / "conf").rglob("*.yaml"):
        for line in path.read_text().splitlines():
            comment = line.partition("#")[2]
            for cited in re.findall(r"[\w./-]+\.(?:md|py|yaml)\b", comment):
                assert (root / cited).exists() or (path.parent / cited).exists(), (path, cited)
