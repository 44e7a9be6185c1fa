"""The layers of DESIGN.md section 7, checked on the source: losses and models import no Ray (they
run in a notebook or any trainer), and the data path imports no model code (a Ray Data task must
not drag torch models into its process). Benchmarks, which measure a whole path, are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.foundation
ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                pkg = path.relative_to(root).parent.parts
                base = list(pkg[: len(pkg) - (node.level - 1)])
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
    return out


def offenders(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for f in files:
        hits = sorted(m for m in imported_modules(f) if m.split(".")[0] in forbidden or m in forbidden
                      or any(m.startswith(p + ".") for p in forbidden))
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    return bad


def test_losses_and_models_import_no_ray():
    files = sorted((ROOT / "workers" / "losses").glob("*.py")) + [ROOT / "workers" / "models.py",
                                                                  ROOT / "workers" / "fusion.py"]
    assert offenders(files, ("ray",)) == {}


def test_the_data_path_imports_no_model_code():
    files = sorted((ROOT / "pipelines").glob("*.py"))  # pipelines/benchmarks/ is exempt
    assert files
    assert offenders(files, ("workers", "tuning", "deepspeed", "transformers.models")) == {}


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    probe = tmp_path / "workers" / "losses" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    import ray.train\n    from ..models import build_model\n")
    mods = imported_modules(probe, root=tmp_path)
    assert "ray.train" in mods and "workers.models" in mods
