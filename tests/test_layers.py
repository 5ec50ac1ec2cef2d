"""DESIGN.md "Layers": imports point down one table, never in a circle; the library never imports gradio
or prints, and never imports the shells (app.py, webui/).

Every import counts: at the top of a module, inside a function (a lazy import still ties the two
modules together) and under ``TYPE_CHECKING``. A module of stylelora/ that is not in the table fails,
so a new module is placed on purpose. docs/architecture.md explains the table.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stylelora"

# Top to bottom. A module may import only modules in rows below its own: lower rows of its own layer or
# any row of a lower layer. Modules in one row do not import each other. The shells (app.py and webui/)
# sit above the whole table and may import any of it; nothing in it imports them.
LAYERS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("shells", [("__main__",), ("cli",), ("cli.main",), ("cli.train", "cli.tools", "cli.evaluate"), ("cli.progress",),
                ("cli.flags",), ("__init__",)]),
    ("services", [("services", "services.jobs", "services.workspace", "services.launch"),
                  ("services.collect", "services.kohya_import", "services.board", "services.sweep"),
                  ("services.kohya_keys",)]),
    ("training", [("training", "training.loop"), ("training.artifacts",),
                  ("training.failures", "training.validation", "training.estimate"),
                  ("training.checkpoint", "training.optim", "training.trackers", "training.precision"),
                  ("training.ema", "training.processes")]),
    ("evaluation", [("evaluation", "evaluation.live", "evaluation.compare"), ("evaluation.runner",),
                    ("evaluation.learned", "evaluation.checkpoints", "evaluation.evalset"), ("evaluation.scores",),
                    ("evaluation.descriptors",)]),
    ("preview", [("preview", "preview.previewer"), ("preview.samplers",)]),
    ("adapters", [("adapters", "adapters.merge"), ("adapters.convert",), ("adapters.formats",),
                  ("adapters.metadata",), ("adapters.adapter",),
                  ("adapters.kohya_names", "adapters.checkpoint_files", "adapters.fused")]),
    ("data", [("data", "data.batches", "data.doctor", "data.autocaption"),
              ("data.buckets", "data.imagecheck", "data.caption_tools"),
              ("data.dataset", "data.cache", "data.images"), ("data.captions",)]),
    ("families", [("families",), ("families.sd2", "families.sdxl", "families.flux", "families.sd3"),
                  ("families.sd1", "families.transformer"),
                  ("families.stable_diffusion", "families.ldm_single_file", "families.loading",
                   "families.original_layout"),
                  ("families.sgm", "families.bfl", "families.mmdit")]),
    ("model", [("model", "model.placement"), ("model.lora", "model.attention"), ("model.base",),
               ("model.text", "model.losses", "model.blocks", "model.builtin")]),
    ("core", [("core", "core.events", "core.metrics"), ("core.config",), ("core.options", "core.fileio"),
              ("core.errors", "core.logs")]),
]
SHELLS = ("app", "webui")  # first-party code outside the library: the Gradio app


@dataclass(frozen=True)
class Import:
    source: str  # dotted module names: stylelora.adapters.formats, webui.context, app
    target: str
    where: str  # file:line, and how (inside a function, under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


@dataclass(frozen=True)
class Place:
    layer: str
    row: int  # counted down the whole table, so a higher number is a lower row
    mates: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.layer} row ({', '.join(self.mates)})"


# --- reading the imports ----------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party(root: Path) -> dict[str, Path]:
    """Every module of the library and the shells under ``root``, by dotted name."""
    files = [root / "app.py", *(root / "stylelora").rglob("*.py"), *(root / "webui").rglob("*.py")]
    return {module_name(p, root): p for p in files if p.is_file()}


def _targets(node: ast.AST, package: str, modules: dict[str, Path]) -> list[str]:
    """The first-party modules one import statement (or importlib/library call) loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if called in {"import_module", "library"} and isinstance(node.args[0].value, str):
            return [node.args[0].value]  # importlib.import_module("stylelora.x"), webui's library("stylelora.x", ...)
    return []


def imports_of(name: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, how: str) -> None:
        for target in _targets(node, package, modules):
            while target and target not in modules:  # ``import stylelora.x.y`` names stylelora.x.y's module
                target = target.rpartition(".")[0]
            edge = Import(name, target, f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}{how}")
            if target and target != name and edge not in found:
                found.append(edge)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            how = ", inside a function"
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, ", under TYPE_CHECKING")
            for child in node.orelse:
                visit(child, how)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, how)

    visit(ast.parse(path.read_text()), "")
    return found


def import_graph(root: Path = ROOT) -> list[Import]:
    modules = first_party(root)
    return [i for name, path in sorted(modules.items()) for i in imports_of(name, path, modules, root)]


# --- checking them ------------------------------------------------------------------------------------


def places(layers: list[tuple[str, list[tuple[str, ...]]]], package: str = "stylelora") -> dict[str, Place]:
    out: dict[str, Place] = {}
    row = 0
    for layer, rows in layers:
        for mates in rows:
            row += 1
            for short in mates:
                out[package if short == "__init__" else f"{package}.{short}"] = Place(layer, row, mates)
    return out


def table_problems(layers: list[tuple[str, list[tuple[str, ...]]]], modules: list[str],
                   package: str = "stylelora") -> list[str]:
    """Library modules missing from the table, placed twice, or placed but gone."""
    named = [package if m == "__init__" else f"{package}.{m}" for _, rows in layers for row in rows for m in row]
    library = {m for m in modules if m == package or m.startswith(package + ".")}
    problems = [f"{m}: in no row of LAYERS in tests/test_layers.py; place it in the layer it belongs to"
                for m in sorted(library - set(named))]
    problems += [f"{m}: in {named.count(m)} rows of LAYERS; keep it in one" for m in sorted(set(named))
                 if named.count(m) > 1]
    problems += [f"{m}: in LAYERS but there is no such module; remove it" for m in sorted(set(named) - library)]
    return problems


def upward_imports(graph: list[Import], layers: list[tuple[str, list[tuple[str, ...]]]],
                   package: str = "stylelora") -> list[str]:
    """Every import by a library module of a module in its own row or above it, or of a shell."""
    where = places(layers, package)
    problems = []
    for edge in graph:
        source, target = where.get(edge.source), where.get(edge.target)
        if source is None:  # a shell (or a module missing from the table, reported on its own)
            continue
        if target is None and edge.target.split(".")[0] in SHELLS:
            problems.append(f"{edge}: the library imports the shells, which sit above the whole table")
        elif target is not None and target.row == source.row:
            problems.append(f"{edge}: {source} imports a module of its own row; rows do not import each other")
        elif target is not None and target.row < source.row:
            problems.append(f"{edge}: {source} imports {target}, which sits above it; imports point down")
    return problems


def cycles(graph: list[Import]) -> list[str]:
    """One import cycle per group of modules that import each other (directly or around), each edge named."""
    edges: dict[str, dict[str, Import]] = {}
    for edge in graph:
        edges.setdefault(edge.source, {}).setdefault(edge.target, edge)
    found, reported = [], set()
    for start in sorted(edges):
        if start in reported:
            continue
        # breadth first, so the shortest way from start back to itself is reported
        paths: dict[str, list[Import]] = {start: []}
        frontier = [start]
        loop = None
        while frontier and loop is None:
            nxt = []
            for node in frontier:
                for target, edge in sorted(edges.get(node, {}).items()):
                    if target == start:
                        loop = [*paths[node], edge]
                        break
                    if target not in paths:
                        paths[target] = [*paths[node], edge]
                        nxt.append(target)
                if loop:
                    break
            frontier = nxt
        if loop:
            reported |= {e.source for e in loop}
            found.append("import cycle: " + " -> ".join([start] + [e.target for e in loop]) + "; "
                         + "; ".join(str(e) for e in loop))
    return found


# --- the tests ----------------------------------------------------------------------------------------


def test_every_library_module_has_one_row_in_the_layer_table() -> None:
    assert table_problems(LAYERS, list(first_party(ROOT))) == []


def test_imports_point_down_the_layer_table() -> None:
    assert upward_imports(import_graph(), LAYERS) == []


def test_no_import_cycle_in_the_library_or_the_shells() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_name_the_edge_of_a_cycle_and_of_an_upward_import(tmp_path: Path) -> None:
    package = tmp_path / "stylelora"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from .high import g\n")  # lazy, upward, and a cycle
    (package / "high.py").write_text("from . import low\n")
    (package / "new.py").write_text("from .low import f\n")
    (tmp_path / "app.py").write_text("import stylelora.high\n")
    layers = [("top", [("high",)]), ("bottom", [("low", "__init__")])]
    graph = import_graph(tmp_path)

    assert {str(e) for e in graph} == {
        "stylelora.low -> stylelora.high (stylelora/low.py:2, inside a function)",
        "stylelora.high -> stylelora.low (stylelora/high.py:1)",
        "stylelora.new -> stylelora.low (stylelora/new.py:1)",
        "app -> stylelora.high (app.py:1)",
    }
    assert upward_imports(graph, layers) == [
        "stylelora.low -> stylelora.high (stylelora/low.py:2, inside a function): bottom row (low, __init__) "
        "imports top row (high), which sits above it; imports point down"
    ]
    assert cycles(graph) == [
        "import cycle: stylelora.high -> stylelora.low -> stylelora.high; stylelora.high -> stylelora.low "
        "(stylelora/high.py:1); stylelora.low -> stylelora.high (stylelora/low.py:2, inside a function)"
    ]
    assert table_problems(layers, list(first_party(tmp_path))) == [
        "stylelora.new: in no row of LAYERS in tests/test_layers.py; place it in the layer it belongs to"
    ]


def _imported_roots(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_gradio() -> None:
    offenders = [p.name for p in PACKAGE.rglob("*.py") if "gradio" in _imported_roots(p)]
    assert offenders == []


def test_library_does_not_print_outside_the_cli() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_only_the_families_import_a_family_module() -> None:
    """Everything else asks the registry (``stylelora.families``) for a model's family, never a family by name."""
    offenders = [str(edge) for edge in import_graph() if edge.target.startswith("stylelora.families.")
                 and not edge.source.startswith("stylelora.families")]
    assert offenders == []
