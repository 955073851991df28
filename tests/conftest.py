"""Shared pytest configuration and fixtures for the vtlab test suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Headless matplotlib everywhere: in this process and in every kernel that the
# notebook tests start (kernels inherit this environment).
os.environ["MPLBACKEND"] = "Agg"

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
ARTIFACTS_DIR = TESTS_DIR / "artifacts"

# Let test modules `import nbrun` (and other helpers here) whether or not
# tests/ becomes a package.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Absolute path of the repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def notebooks_dir() -> Path:
    """Absolute path of notebooks/."""
    return NOTEBOOKS_DIR


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """tests/artifacts/ (git-ignored): a place for screenshots, executed notebooks, logs."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


def pytest_configure(config):
    # Markers for the classroom tests; select with e.g. `pytest -m nbgrader` / `-m "not binder"`.
    config.addinivalue_line("markers", "nbgrader: nbgrader course pipeline (student versions, autograde, validate)")
    config.addinivalue_line("markers", "binder: a fresh venv built only from binder/requirements.txt runs the notebooks")
    config.addinivalue_line("markers", "needs_vm: runs a workload under vtlab.VirtualMachine")
