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


def _cache_dir() -> Path:
    """vtlab's cache folder, outside the repository: no test writes into the tree.

    ``$VTLAB_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vtlab``, else ``~/.cache/vtlab``.
    It holds what is worth keeping between runs (the Binder test's venv) and the test
    artifacts (executed notebooks, screenshots, logs) for a look after a failure.
    """
    if os.environ.get("VTLAB_CACHE_DIR"):
        return Path(os.environ["VTLAB_CACHE_DIR"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().resolve() / "vtlab"


#: Cache folder (see _cache_dir); test modules import these two names from here.
CACHE_DIR = _cache_dir()
#: Executed notebooks, screenshots and logs of the last run ($VTLAB_TEST_ARTIFACTS wins).
ARTIFACTS_DIR = Path(os.environ.get("VTLAB_TEST_ARTIFACTS") or CACHE_DIR / "test-artifacts")

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
    """A place outside the repository for screenshots, executed notebooks and logs."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


def pytest_configure(config):
    # Markers for the classroom tests; select with e.g. `pytest -m nbgrader` / `-m "not binder"`.
    config.addinivalue_line("markers", "nbgrader: nbgrader course pipeline (student versions, autograde, validate)")
    config.addinivalue_line("markers", "binder: a fresh venv built only from binder/requirements.txt runs the notebooks")
    config.addinivalue_line("markers", "needs_vm: runs a workload under vtlab.VirtualMachine")
    config.addinivalue_line("markers", "site: builds the course site (make site)")
    config.addinivalue_line("markers", "slow: left out of `make check` (-m 'not slow'); set by tests/conftest.py")


# --------------------------------------------------------------------------- make check
#: What `make check` (pytest -m "not slow") leaves out, by file: each of these starts
#: kernels, browsers, pip or long fuzz runs, and together they take most of the suite's
#: time.  None marks the whole file; a marker name marks only the tests carrying it
#: (test_binder.py's pin checks are instant; its notebook runs are not).  Kept here, by
#: file name, so that no test file needs editing; `make test` still runs everything.
SLOW_FILES: dict[str, str | None] = {
    "test_notebooks.py": None,      # every course notebook, top to bottom, in a kernel
    "test_course_01.py": None,      # the course notebooks again, cell by cell, + nbgrader
    "test_course_02_03.py": None,
    "test_course_04.py": None,
    "test_course_05.py": None,
    "test_course_06.py": None,
    "test_course_07.py": None,
    "test_nbgrader.py": None,       # generate / autograde / validate with real kernels
    "test_fuzz.py": None,           # random programs in worker processes
    "test_browser.py": None,        # JupyterLab + Chromium
    "test_binder.py": "binder",     # a venv built from binder/requirements.txt
    "test_grading.py": "nbgrader",  # tools/autograde.py grading classes with real kernels
    "test_teaching.py": "site",     # the course site build (the hub checks are instant)
    "test_learner_versions.py": "nbgrader",  # its layout checks are fast; autograding is not
}
#: Single tests left out of `make check`, as "file::test" (any parametrization): each
#: takes several seconds, stress-testing sizes rather than behaviour the other tests miss.
SLOW_TESTS = frozenset({
    "test_robustness.py::test_many_exits_in_bounded_memory",
    "test_robustness.py::test_many_virtual_machines_do_not_grow_rss",
    "test_asm_errors.py::test_random_garbage_gives_code_or_an_assembly_error",
    "test_asm_errors.py::test_times_below_the_count_limit_is_still_held_to_1_mib_of_code",
})


def pytest_ignore_collect(collection_path, config):
    """Under exactly ``-m "not slow"`` (make check), do not even import the wholly slow
    files: they import nbclient, nbgrader and friends, seconds of start-up for tests that
    would all be deselected anyway."""
    if config.getoption("markexpr", "") == "not slow" and SLOW_FILES.get(collection_path.name, "") is None:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        name = item.path.name
        if name in SLOW_FILES:
            marker = SLOW_FILES[name]
            if marker is None or item.get_closest_marker(marker) is not None:
                item.add_marker(slow)
        elif f"{name}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS:
            item.add_marker(slow)
