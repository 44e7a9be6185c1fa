"""The project stands alone: every "docs/design.md section N" that code, tests, configs or docs cite names a
section that docs/design.md has, every relative link in the markdown outside docs/ (README.md,
infra/README.md; mkdocs checks the pages under docs/) points at a file of the repo, and nothing points at
files outside the repo (a design document or data notes the user who clones it does not have)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.foundation
ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt"}
SECTION_REF = re.compile(r"design\.md,? section (\d+)", re.IGNORECASE)
HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\bDESIGN\.md\b|\.\./shared/|\bPLATFORM\.md\b|\bDATA\.md\b")


def repo_files(root: Path = ROOT) -> list[Path]:
    skip = {".git", ".venv", "site", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis"}
    me = Path(__file__).resolve()  # this file plants broken references on purpose
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                  and not skip.intersection(p.relative_to(root).parts) and p.resolve() != me)


def design_sections(root: Path = ROOT) -> set[int]:
    return {int(n) for n in HEADING.findall((root / "docs" / "design.md").read_text())}


def dangling_section_refs(root: Path = ROOT) -> list[str]:
    sections = design_sections(root)
    return [f"{p.relative_to(root)}: section {n}" for p in repo_files(root)
            for n in SECTION_REF.findall(p.read_text(errors="replace")) if int(n) not in sections]


def outside_refs(root: Path = ROOT) -> list[str]:
    return [f"{p.relative_to(root)}: {m.group(0)}" for p in repo_files(root)
            for m in OUTSIDE.finditer(p.read_text(errors="replace"))]


def broken_links(root: Path = ROOT) -> list[str]:
    out = []
    for page in (root / "README.md", *sorted((root / "infra").rglob("*.md"))):
        for target in MD_LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                out.append(f"{page.relative_to(root)}: {target}")
    return out


def test_the_design_has_the_sections_the_code_cites():
    assert design_sections() >= set(range(1, 10))
    assert dangling_section_refs() == []


def test_nothing_points_outside_the_repo():
    assert outside_refs() == []


def test_relative_links_outside_the_docs_resolve():
    assert broken_links() == []


def test_the_checks_catch_a_planted_break(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "infra").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# d\n\n## 1. Flow\n\n## 2. Record\n")
    (tmp_path / "code.py").write_text('"""See docs/design.md section 2 and docs/design.md section 9."""\n')
    (tmp_path / "notes.md").write_text("The formulas: " + "../" + "shared/" + "DESIGN" + ".md\n")  # split: no real pointer here
    (tmp_path / "README.md").write_text("[here](docs/design.md) and [gone](docs/nope.md#x) [web](https://x.org)\n")
    assert dangling_section_refs(tmp_path) == ["code.py: section 9"]
    assert len(outside_refs(tmp_path)) == 2  # the folder and the file name, each caught
    assert broken_links(tmp_path) == ["README.md: docs/nope.md#x"]
