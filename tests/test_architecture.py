"""The house rules of docs/ARCHITECTURE.md that import-linter cannot check: no module over 400
lines, no class over 150, and every stage package saying what it owns and may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("gateway", "model", "training") for p in sorted((REPO / folder).rglob("*.py"))
           if "__pycache__" not in p.parts]
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150
# Modules still being split (issue 15); this list only shrinks.
PENDING_SPLIT: set[str] = set()


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_tree_is_found() -> None:
    assert len(SOURCES) > 40


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_module_size(path: Path) -> None:
    if _name(path) in PENDING_SPLIT:
        pytest.skip("being split")
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_name(path)} has {lines} lines (limit {MAX_MODULE_LINES}): split it"


@pytest.mark.parametrize("path", SOURCES, ids=_name)
def test_class_size(path: Path) -> None:
    if _name(path) in PENDING_SPLIT:
        pytest.skip("being split")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    big = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
           if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert not big, f"{_name(path)}: classes over {MAX_CLASS_LINES} lines: {big}"


STAGES = ["core", "store", "receive", "work", "report", "deliver", "operate", "groundtruth", "backfill"]


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_says_what_it_owns_and_may_import(stage: str) -> None:
    doc = ast.get_docstring(ast.parse((REPO / "gateway" / stage / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "May import" in doc, f"gateway/{stage}/__init__.py must say what it owns and may import"


def test_architecture_map_names_every_stage() -> None:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [stage for stage in STAGES if f"{stage}/" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not show {missing}"
