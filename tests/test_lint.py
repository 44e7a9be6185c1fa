"""Static checks that catch real mistakes cheaply: pyflakes' rules (ruff `F`: unused imports and
variables, undefined names, redefinitions) over every Python file of the project."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.foundation
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_the_project_passes_pyflakes_rules():
    proc = ruff(".")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_the_check_finds_an_unused_import_and_an_undefined_name(tmp_path):
    (tmp_path / "bad.py").write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    proc = ruff("--select", "F", "--isolated", str(tmp_path / "bad.py"), cwd=str(tmp_path))
    assert proc.returncode == 1
    assert "F401" in proc.stdout and "F821" in proc.stdout


def test_a_file_over_500_lines_says_why_at_its_top():
    """The house rule: a long module's docstring says why it is long ("Length (...)" or "Over 500 lines")."""
    import ast
    import re

    files = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    unexplained = []
    for rel in files.split():
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        if text.count("\n") <= 500:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not re.search(r"^(Length \(|Over 500 lines)", doc, re.M):
            unexplained.append(f"{rel} ({text.count(chr(10))} lines)")
    assert not unexplained, "over 500 lines without saying why at the top: " + ", ".join(unexplained)
