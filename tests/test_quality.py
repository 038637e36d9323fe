"""ruff and mypy run as part of the test suite (STYLE.md)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def require(tool: str, present: bool) -> None:
    """Skip on a developer machine without the tool; in CI (which installs .[test]) fail instead."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{tool} is not installed, so this check would silently not run; pip install '.[test]'")
    pytest.skip(f"{tool} is not installed")


def test_ruff_is_clean():
    require("ruff", shutil.which("ruff") is not None)
    result = subprocess.run(["ruff", "check", "src", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    require("mypy", importlib.util.find_spec("mypy") is not None)
    result = subprocess.run([sys.executable, "-m", "mypy", "src/stemedb"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
