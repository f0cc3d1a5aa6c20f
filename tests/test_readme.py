"""Every Python code block of the README runs as written (each in a fresh namespace). A block right after a
`<!-- requires cuda -->` line runs only where danlu's CUDA kernels can run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.devices import requires_cuda

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- requires cuda -->\n)?```python\n(.*?)```", re.S)


def blocks():
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start(2)) + 1
        marks = [requires_cuda] if match.group(1) else []
        found.append(pytest.param(match.group(2), id=f"line-{line}", marks=marks))
    return found


def test_the_readme_has_code_to_run():
    assert len(blocks()) >= 4


@pytest.mark.parametrize("code", blocks())
def test_readme_block_runs_as_written(code, capsys):
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


def test_the_test_command_is_what_ci_runs():
    readme, ci = README.read_text(), (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest tests -q" in readme and "pytest tests -q" in ci
    assert 'pip install ".[bench,test]"' in readme and ".[bench,test]" in ci
