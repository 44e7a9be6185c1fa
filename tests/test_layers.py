"""The layers of docs/design.md section 7, checked on the source of every package, nothing exempt.

Every import of the project (function-level ones included, read from the AST) must point down the
table LAYERS: a layer imports only the layers listed for it. On top of that, losses and models
import no Ray (they run in a notebook or any trainer), the data path imports no DeepSpeed or model
code (a Ray Data task must not drag them into its process), and the whole module graph has no
import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.foundation
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gammaray", "pipelines", "workers", "tuning", "infra")

# The layer picture, bottom to top: each layer and the project layers it may import (itself included).
# An arrow not listed here points up or sideways.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": ("foundation",),                                  # gammaray/: config tree, record schema
    "pipelines": ("foundation", "pipelines"),                       # records, storage, Ray Data
    "workers.lib": ("foundation", "workers.lib"),                   # workers/losses, workers/models, workers/safe_load.py
    "workers": ("foundation", "pipelines", "workers.lib", "workers"),  # runtime, training, evaluation
    "tuning": ("foundation", "pipelines", "workers.lib", "workers", "tuning"),
    "infra": ("foundation", "infra"),  # operations beside the library: the config tree only
    "app": ("foundation", "pipelines", "workers.lib", "workers", "tuning", "infra", "app"),  # gammaray/app/
}
# third-party code a layer must not import
FORBIDDEN_OUTSIDE = {
    "pipelines": ("deepspeed", "transformers.models"),
    "workers.lib": ("ray",),
}


def layer_of(module: str) -> str | None:
    """The layer of a project module, None for anything outside the project."""
    parts = module.split(".")
    if parts[0] == "gammaray":
        return "app" if parts[1:2] == ["app"] else "foundation"
    if parts[0] == "workers":
        # safe_load (torch.load restricted to weights) is library code: the model registry loads through it
        return "workers.lib" if parts[1:2] in (["losses"], ["models"], ["safe_load"]) else "workers"
    return parts[0] if parts[0] in PACKAGES else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    return sorted(f for p in packages for f in (root / p).rglob("*.py"))


def imported_modules(path: Path, root: Path = ROOT, known: set[str] = frozenset()) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included). Relative
    imports are resolved against the file's package, and `from pkg import name` names the
    submodule pkg.name when that is one of `known`."""
    out: set[str] = set()
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            subs = {f"{base}.{a.name}" for a in node.names} & set(known)
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(base)
    return out


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """{module: the project modules it imports}, each import resolved to the longest known module."""
    files = {module_name(f, root): f for f in project_files(root, packages)}
    known = set(files)
    graph = {}
    for mod, f in files.items():
        targets = set()
        for imp in imported_modules(f, root, known):
            parts = imp.split(".")
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in known:
                    targets.add(".".join(parts[:n]))
                    break
        graph[mod] = targets - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_python_file_of_the_project_is_in_a_layer():
    """Nothing exempt: every .py outside tests/ belongs to a package the layer table covers."""
    skip = {"tests", "docs", "build", "dist", "runs"}
    tops = [p for p in ROOT.iterdir() if not p.name.startswith(".") and p.name not in skip
            and not p.name.endswith(".egg-info")]
    files = [f for p in tops for f in ([p] if p.suffix == ".py" else p.rglob("*.py") if p.is_dir() else [])]
    assert files
    assert sorted(str(f.relative_to(ROOT)) for f in files if layer_of(module_name(f)) is None) == []
    assert {layer_of(module_name(f)) for f in files} == set(LAYERS)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_a_layer_imports_only_the_layers_below_it(graph, layer):
    allowed = LAYERS[layer]
    bad = {mod: sorted(t for t in targets if layer_of(t) not in allowed)
           for mod, targets in graph.items() if layer_of(mod) == layer}
    assert {m: t for m, t in bad.items() if t} == {}, f"upward or sideways imports from {layer} (allowed: {allowed})"


@pytest.mark.parametrize("layer", list(FORBIDDEN_OUTSIDE))
def test_third_party_code_a_layer_must_not_import(layer):
    forbidden = FORBIDDEN_OUTSIDE[layer]
    files = [f for f in project_files() if layer_of(module_name(f)) == layer]
    assert files
    bad = {}
    for f in files:
        hits = sorted(m for m in imported_modules(f) if any(m == p or m.startswith(p + ".") for p in forbidden))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert bad == {}


def test_nothing_below_the_application_layer_imports_it(graph):
    assert {m: sorted(t for t in ts if layer_of(t) == "app")
            for m, ts in graph.items() if layer_of(m) != "app" and any(layer_of(t) == "app" for t in ts)} == {}


def test_evaluation_never_imports_training(graph):
    """Training evaluates as it goes (the loop, the heads trainer); evaluation only reads models."""
    assert {m: sorted(t for t in ts if t.startswith("workers.training"))
            for m, ts in graph.items() if m.startswith("workers.evaluation")
            and any(t.startswith("workers.training") for t in ts)} == {}


def test_the_import_graph_has_no_cycle(graph):
    assert cycles(graph) == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "workers" / "losses" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    import ray.train\n    from ..models import build_model\n")
    mods = imported_modules(probe, root=tmp_path)
    assert "ray.train" in mods and "workers.models" in mods


def test_the_checker_resolves_from_package_import_submodule(tmp_path):
    for rel, text in {"pipelines/__init__.py": "", "pipelines/stream.py": "",
                      "pipelines/reader.py": "from pipelines import stream, LIMIT\nfrom . import stream as s\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = import_graph(tmp_path, ("pipelines",))
    assert g["pipelines.reader"] == {"pipelines.stream", "pipelines"}


def test_the_checker_finds_a_planted_cycle(tmp_path):
    files = {"workers/__init__.py": "", "workers/a.py": "def f():\n    from workers.b import g\n",
             "workers/b.py": "from .c import h\n", "workers/c.py": "import workers.a\n", "workers/d.py": "import workers.a\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cycles(import_graph(tmp_path, ("workers",))) == [["workers.a", "workers.b", "workers.c"]]
