"""grit.py reads top to bottom: each section uses only itself and the sections
above it, the module docstring lists the sections as they are, and no function
runs over 60 lines. Reads the source; runs nothing of it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "grit.py"
LONGEST_FUNCTION = 60


def sections(lines: list[str]) -> list[tuple[int, str]]:
    """(first line number, title) of each banner: a title between two rules."""
    return [(i + 2, lines[i + 1][2:].strip()) for i in range(len(lines) - 2)
            if lines[i].startswith("# ====") and lines[i + 2].startswith("# ====")]


def section_at(found: list[tuple[int, str]], line: int) -> tuple[int, str]:
    return max((s for s in found if s[0] <= line), default=(0, "(module head)"))


def top_level_names(tree: ast.Module) -> dict[str, int]:
    """Each name a module-level statement binds, with the line of its first binding."""
    names: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:  # a name, or names unpacked (not EXECUTORS["x"] = ...)
                for n in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(n, ast.Name):
                        names.setdefault(n.id, node.lineno)
    return names


class Uses(ast.NodeVisitor):
    """The module-level names a statement reads, leaving out annotations and
    names that a function binds for itself (parameters, locals)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, int]] = []
        self.local: list[set[str]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(default)
        for decorator in getattr(node, "decorator_list", []):
            self.visit(decorator)
        args = node.args
        bound = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        bound |= {a.arg for a in (args.vararg, args.kwarg) if a}
        body = node.body if isinstance(node.body, list) else [node.body]
        for statement in body:
            for n in ast.walk(statement):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    bound.add(n.id)
                elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    bound.add(n.name)
        self.local.append(bound)
        for statement in body:
            self.visit(statement)
        self.local.pop()

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value:
            self.visit(node.value)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not any(node.id in s for s in self.local):
            self.found.append((node.id, node.lineno))


def back_references(source: str) -> list[str]:
    lines = source.splitlines()
    found = sections(lines)
    tree = ast.parse(source)
    defined = top_level_names(tree)
    problems = []
    for node in tree.body:
        uses = Uses()
        uses.visit(node)
        user = section_at(found, node.lineno)
        for name, line in uses.found:
            if name in defined:
                owner = section_at(found, defined[name])
                if owner[0] > user[0]:
                    problems.append(f"grit.py:{line}: {name} (section {owner[1]!r}, line "
                                    f"{defined[name]}) used in section {user[1]!r}, above it")
    return problems


def test_every_section_uses_only_itself_and_the_sections_above_it():
    assert back_references(SOURCE.read_text()) == []


def test_a_use_of_a_later_section_is_found():
    """The check itself: a name from a later section is named with both sections."""
    source = ('"""x"""\n# ====\n# First\n# ====\ndef f(a):\n    b = 1\n    return g() + a + b\n'
              '# ====\n# Second\n# ====\ndef g():\n    return f(0)\n')
    assert back_references(source) == [
        "grit.py:7: g (section 'Second', line 11) used in section 'First', above it"]


def test_the_module_docstring_lists_the_sections_in_order():
    source = SOURCE.read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    listed = doc.split("Sections, in the order data flows through them:", 1)[1]
    listed = listed.split("\nEach section", 1)[0]
    listed = [s.strip() for s in re.split(r"→|\n", listed) if s.strip()]
    assert listed == [title for _, title in sections(source.splitlines())]


def test_every_section_opens_with_what_it_owns():
    lines = SOURCE.read_text().splitlines()
    for line, title in sections(lines):
        assert lines[line + 1].startswith("# ") and len(lines[line + 1]) > 10, \
            f"section {title!r} (line {line}) has no head comment"


def test_no_function_is_longer_than_60_lines():
    tree = ast.parse(SOURCE.read_text())
    long = [f"{n.name} (line {n.lineno}): {n.end_lineno - n.lineno + 1} lines"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > LONGEST_FUNCTION]
    assert long == []


def test_every_module_level_name_is_bound_once():
    """A second definition further down would silently replace the first."""
    tree = ast.parse(SOURCE.read_text())
    seen: dict[str, int] = {}
    twice = []
    for node in tree.body:
        bound = top_level_names(ast.Module(body=[node], type_ignores=[]))
        for name in bound:
            if name in seen:
                twice.append(f"{name}: line {seen[name]} and line {node.lineno}")
            seen.setdefault(name, node.lineno)
    assert twice == []
