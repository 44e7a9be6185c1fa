"""The docs: `mkdocs build --strict` succeeds (and a broken link or nav entry fails it), every generated
part under docs/ is what `python -m gammaray.app.docs` writes from the committed JSON and the config
tree now, and the README stays short, keeps the two set-up commands and links only to pages that
exist. Each build takes about a second."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gammaray.app import docs

pytestmark = pytest.mark.foundation
ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=120)


def copy_of_the_docs(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("*.png", "*.json", "*.log"))
    shutil.copy(ROOT / "mkdocs.yml", root)
    return root


def test_the_docs_build_in_strict_mode(tmp_path):
    r = build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("index.html", "benchmarks/index.html", "design/index.html", "config-reference/index.html",
                 "bench/recipe/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


@pytest.mark.parametrize("plant", ["link", "anchor", "nav"])
def test_a_broken_link_or_nav_entry_fails_the_strict_build(tmp_path, plant):
    root = copy_of_the_docs(tmp_path)
    if plant == "link":
        with open(root / "docs" / "design.md", "a") as f:
            f.write("\nSee [the missing page](no-such-page.md).\n")
    elif plant == "anchor":
        with open(root / "docs" / "design.md", "a") as f:
            f.write("\nSee [a missing section](benchmarks.md#no-such-section).\n")
    else:
        yml = (root / "mkdocs.yml").read_text().replace("  - Changelog: changelog.md",
                                                        "  - Changelog: changelog.md\n  - Gone: no-such-page.md")
        (root / "mkdocs.yml").write_text(yml)
    r = build(root, tmp_path / "site")
    assert r.returncode != 0
    assert "no-such" in r.stdout + r.stderr


def test_every_generated_part_is_what_the_generator_writes_now():
    assert docs.stale() == [], "regenerate with `python -m gammaray.app.docs`"
    names = {m["name"] for p in docs.pages() for m in docs.BLOCK.finditer(p.read_text())}
    assert names == set(docs.BLOCKS), "a generator nothing uses, or a block twice"


def test_an_edited_table_is_caught(tmp_path):
    root = copy_of_the_docs(tmp_path)
    page = root / "docs" / "benchmarks.md"
    text = page.read_text()
    edited = text.replace("| synthetic | infonce | 16 | 0.049 |", "| synthetic | infonce | 16 | 0.059 |", 1)
    assert edited != text
    page.write_text(edited)
    (root / "docs" / "config-reference.md").write_text("typed by hand\n")
    assert docs.stale(root) == ["docs/config-reference.md", "docs/benchmarks.md"]


def test_the_readme_demo_figures_are_the_committed_runs(tmp_path):
    """The README's demo output is rendered from docs/bench/demo.json: a figure typed over it is caught."""
    readme = (ROOT / "README.md").read_text()
    block = next(m for m in docs.BLOCK.finditer(readme) if m["name"] == "demo")
    first = docs.load("demo.json")["runs"][0]
    figure = f"{first['r_at_1_i2t']:.3f}"
    assert figure in block["body"] and "mean ± std" in block["body"]
    root = copy_of_the_docs(tmp_path)
    (root / "README.md").write_text(readme.replace(block["body"], block["body"].replace(figure, "0.999", 1)))
    assert docs.stale(root) == ["README.md"]


def test_the_benchmarks_page_types_no_table():
    outside = docs.BLOCK.sub("", (ROOT / "docs" / "benchmarks.md").read_text())
    assert [line for line in outside.splitlines() if line.startswith("|")] == []


def test_the_readme_is_short_has_the_two_commands_and_links_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "make demo" in readme and "make test" in readme
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).is_file()] == []
