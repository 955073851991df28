"""Every course notebook is stored clean, and both versions of it run in a fresh kernel.

- The instructor source ``course/source/<a>/<a>.ipynb`` (solutions, hidden tests) runs
  top to bottom with no error at all.
- The learner version ``notebooks/<a>.ipynb`` (what ``make lab``, Binder and the hub
  open; answers are nbgrader's ``raise NotImplementedError()`` stub) runs to the end
  without hanging; errors are allowed only in answer cells and in the test cells after
  them, and no test cell passes without an answer.

The key results of each source are checked by tests/test_course_*.py; that the learner
version is what nbgrader makes from the source, by tests/test_learner_versions.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ARTIFACTS_DIR
from nbrun import KERNEL_NAME, NotebookRunError, _kernel_env, check_kernel, run_notebook

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO / "course" / "source"
LEARNER_DIR = REPO / "notebooks"
SOURCES = sorted(p for p in SOURCE_DIR.glob("*/*.ipynb") if p.parent.name == p.stem)
LEARNERS = sorted(LEARNER_DIR.glob("*.ipynb"))
ARTIFACTS = ARTIFACTS_DIR / "notebooks"   # outside the repository (tests/conftest.py)
#: A learner version ends (every cell run, the stubs raising) in well under this.
LEARNER_LIMIT_S = 120


def nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def test_every_source_has_a_learner_version_and_back():
    assert SOURCES, f"no instructor sources in {SOURCE_DIR}"
    assert [p.stem for p in SOURCES] == [p.stem for p in LEARNERS], (
        "course/source/<a>/<a>.ipynb and notebooks/<a>.ipynb must come in pairs; "
        "run `make notebooks`"
    )


@pytest.mark.parametrize("path", SOURCES + LEARNERS,
                         ids=[f"source-{p.stem}" for p in SOURCES] + [f"learner-{p.stem}" for p in LEARNERS])
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.relative_to(REPO)}: code cells {dirty} have outputs or an execution count; "
        f"store notebooks cleared (`jupyter nbconvert --clear-output --inplace {path.name}`, "
        f"then `make notebooks`)"
    )


@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_instructor_source_executes(path):
    failure = None
    try:
        run_notebook(path, save_to=ARTIFACTS / "source" / path.name)
    except NotebookRunError as exc:
        failure = str(exc)
    if failure is not None:  # fail outside the except block: one clean report
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("path", LEARNERS, ids=[p.stem for p in LEARNERS])
def test_learner_version_fails_only_in_exercises_and_never_hangs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    answers = [nbg(c)["grade_id"] for c in nb.cells if nbg(c).get("solution")]
    tests = [nbg(c)["grade_id"] for c in nb.cells if nbg(c).get("grade")]
    assert len(answers) >= 3 and tests, f"{path.name}: expected answer and test cells"
    for cell in nb.cells:
        if nbg(cell).get("solution"):
            assert "raise NotImplementedError()" in cell.source, (
                f"{path.name}: answer cell {nbg(cell)['grade_id']} is not nbgrader's stub"
            )
    check_kernel()
    client = NotebookClient(nb, timeout=60, kernel_name=KERNEL_NAME, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute(env=_kernel_env())
    seconds = time.perf_counter() - start
    (ARTIFACTS / "learner").mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, ARTIFACTS / "learner" / path.name)

    errored: dict[str, str] = {}
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                errored[nbg(cell).get("grade_id") or f"cell {i}"] = f"{out['ename']}: {out.get('evalue', '')[:120]}"
    assert not [k for k, v in errored.items() if v.startswith("CellTimeoutError")], errored
    assert seconds < LEARNER_LIMIT_S, f"{path.name}: the untouched learner version took {seconds:.0f} s"
    exercise_cells = set(answers) | set(tests)
    outside = {k: v for k, v in errored.items() if k not in exercise_cells}
    assert not outside, f"{path.name}: errors outside the answer and test cells: {outside}"
    passing = [t for t in tests if t not in errored]
    assert not passing, f"{path.name}: test cells that pass without an answer: {passing}"
