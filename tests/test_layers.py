"""DESIGN.md: nothing under stylelora/ imports gradio or prints; the shells hold no logic."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stylelora"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_gradio() -> None:
    offenders = [p.name for p in PACKAGE.rglob("*.py") if "gradio" in _imports(p)]
    assert offenders == []


def test_library_does_not_print_outside_the_cli() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in {"cli.py", "__main__.py"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
