"""The layering the README's Architecture table states, checked from the imports themselves (module level and
inside functions): which package may import which, no import cycle between modules, the planning seam (only the
registry imports a policy; no daemon does), no private name imported across modules, nothing imports coinfer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "protocol", "models", "edged", "deviced", "coinfer")
POLICY_MODULES = {"planner.edgent", "planner.mincut", "planner.lyapunov", "planner.baselines"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            found[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _edges() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names in _imports(path):
            hits = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES} or (
                {target} if target in MODULES else set())
            edges[mod] |= hits - {mod}
    return edges


def _allowed() -> dict[str, set[str]]:
    """The README's Architecture table: folder -> the project packages its last column lets it import."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    allowed = {}
    for line in section.splitlines()[2:12]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        folders = re.findall(r"`(\w+)/`", cells[0]) if cells else []
        for folder in folders:
            if folder in PACKAGES:
                allowed[folder] = set(re.findall(r"`(\w+)`", cells[-1])) & set(PACKAGES)
    return allowed


def test_packages_import_only_what_the_readme_allows() -> None:
    allowed = _allowed()
    assert set(allowed) == set(PACKAGES), "the README's table names every package"
    wrong = sorted(f"{a} -> {b}" for a, targets in _edges().items() for b in targets
                   if a.split(".")[0] != b.split(".")[0] and b.split(".")[0] not in allowed[a.split(".")[0]])
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    edges, state, cycles = _edges(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_seam_holds() -> None:
    edges = _edges()
    for mod, targets in edges.items():
        policies = targets & POLICY_MODULES
        if mod.startswith("planner.") and mod != "planner.policies":
            assert not policies, f"{mod} imports a policy: {policies}"
        if mod.startswith(("deviced", "edged")):
            assert not policies, f"the daemon module {mod} imports a policy: {policies}"
    assert edges["planner.policies"] >= POLICY_MODULES


def test_no_private_name_crosses_a_module_and_nothing_imports_coinfer() -> None:
    for mod, path in MODULES.items():
        for target, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not (private and target in MODULES), f"{mod} imports {private} from {target}"
            if not mod.startswith("coinfer"):
                assert not target.startswith("coinfer"), f"{mod} imports {target}"
