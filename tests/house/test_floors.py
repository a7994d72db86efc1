"""The floors of `mispo/` (docs/architecture.md) hold: which floor may import which, read from the code's own
imports (top-level and lazy ones alike), and no import cycle between modules."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mispo"

# floor -> the floors it must never import (the hall, algorithms/ and the rest stay open to all)
FORBIDDEN = {
    "rollout": {"learner", "loop"},
    "learner": {"rollout", "loop"},
    "weights": {"loop", "rollout", "learner", "scoring"},
    "infra": {"loop", "rollout", "learner", "scoring", "weights"},
    "scoring": {"loop", "rollout", "learner", "weights"},
    "algorithms": {"loop", "rollout", "learner", "weights", "infra", "scoring"},
}


def imports_of(path: Path) -> set[str]:
    """Every `mispo.*` module a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "mispo" or m.startswith("mispo.")}


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_a_floor_imports_none_of_the_floors_above_it(floor):
    wrong = sorted(f"{module} imports {target}" for module, targets in MODULES.items()
                   if module.startswith(f"mispo.{floor}.") for target in targets
                   if target.split(".")[1:2] and target.split(".")[1] in FORBIDDEN[floor])
    assert not wrong, wrong


def test_no_module_level_import_cycle():
    """Cycles among top-level imports (those run when a module is imported); lazy imports inside functions may
    point back up."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("mispo."):
                top.add(node.module)
            elif isinstance(node, ast.Import):
                top.update(a.name for a in node.names if a.name.startswith("mispo."))
        graph[module_of(path)] = {t for t in top if t in MODULES}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycle, cycle


def test_the_hall_holds_only_the_commands_and_the_shared_vocabulary():
    hall = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert hall == ["__init__", "__main__", "auto_registration", "bands", "batch", "cli", "config", "data", "evaluate",
                    "generate", "pipeline", "plot", "prepare_model", "sft"], "a new root module: give it a floor " \
                                                                            "(docs/architecture.md) or add it here"
