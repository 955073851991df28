"""The course works with nbgrader 0.9: student versions, autograding, validation.

Runs on every instructor source ``course/source/<a>/<a>.ipynb``, plus the small fixture
``tests/fixtures/nbgrader_sample.ipynb`` (so the machinery is tested on its own too). For each notebook, in a course directory of its own under
a temp dir, through ``tools/nbgrader_course.py`` (the code behind ``make assignments``
and ``make autograde``):

- the student version carries no solution text and no hidden test;
- three submissions are autograded: the instructor's solutions (full marks), the
  untouched student version (for a course assignment the committed learner version
  ``notebooks/<a>.ipynb``: zero, no crash, no timeout) and the student version with
  only the first answer filled in (partial marks); scores are read from the exported
  CSV and per cell from the gradebook;
- ``nbgrader.validator.Validator`` passes on the instructor notebook (the
  ``nbgrader validate`` CLI exits 0 even when cells fail, so it is not used).

Select with ``pytest -m nbgrader``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nbformat
import pytest

from nbgrade import (  # noqa: F401  (shared with tests/test_learner_versions.py)
    CASES,
    CELL_TIMEOUT,
    FIXTURE,
    HIDDEN_DELIMS,
    IDS,
    REPO,
    SOLUTION_DELIMS,
    STUDENTS,
    Graded,
    cell_grades,
    cell_text,
    course,
    graded_once,
    is_grade,
    is_solution,
    nbg,
    protected_text,
    read_csv,
    split_regions,
    submission_from,
)

pytestmark = [
    pytest.mark.nbgrader,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*not in session.*"),
]


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def graded(request, tmp_path_factory) -> Graded:
    """Generate the student version and autograde full / blank / partial submissions
    (built once per session, tests/nbgrade.py)."""
    return graded_once(request.param, tmp_path_factory)


# --------------------------------------------------------------------------- notebook metadata


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_nbgrader_metadata_follows_conventions(path):
    """docs/NOTEBOOKS.md: schema 3, unique grade_ids, locked test cells with points,
    code answer cells, no manually graded cells, no input()."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    ids = [nbg(c).get("grade_id") for c in nb.cells if nbg(c)]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.append(f"duplicate grade_id(s): {dupes}")
    for i, cell in enumerate(nb.cells):
        meta = nbg(cell)
        where = f"cell {i} ({meta.get('grade_id', 'no grade_id')})"
        if cell.cell_type == "code" and re.search(r"(?<![\w.])input\s*\(", cell.source):
            problems.append(f"{where}: calls input(); exercises must never block")
        for delim in SOLUTION_DELIMS + HIDDEN_DELIMS:
            if delim in cell.source and not (is_solution(cell) or is_grade(cell)):
                problems.append(f"{where}: contains {delim!r} but is neither an answer nor a test cell")
        if not meta:
            continue
        if meta.get("schema_version") != 3:
            problems.append(f"{where}: schema_version {meta.get('schema_version')!r}, expected 3")
        if not meta.get("grade_id"):
            problems.append(f"{where}: missing grade_id")
        if meta.get("task"):
            problems.append(f"{where}: task cells are graded by hand; the course is autograded")
        if meta.get("solution") and meta.get("grade"):
            problems.append(f"{where}: answer cell with grade: true is graded by hand; use a separate test cell")
        if meta.get("solution") and cell.cell_type != "code":
            problems.append(f"{where}: answer cells must be code cells")
        if meta.get("solution") and meta.get("locked"):
            problems.append(f"{where}: an answer cell cannot be locked")
        if meta.get("grade"):
            if cell.cell_type != "code":
                problems.append(f"{where}: test cells must be code cells")
            if not meta.get("locked"):
                problems.append(f"{where}: test cell must be locked")
            if not meta.get("points", 0) > 0:
                problems.append(f"{where}: test cell needs points > 0")
    if not any(is_solution(c) for c in nb.cells):
        problems.append("no answer cells")
    if not any(is_grade(c) for c in nb.cells):
        problems.append("no test cells")
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- student version


def test_student_version_has_no_solutions_or_hidden_tests(graded):
    lines, blocks = protected_text(graded.instructor)
    student_lines = {l.strip() for c in graded.student.cells for l in c.source.split("\n")}
    raw = graded.release_path.read_text(encoding="utf-8")
    text = cell_text(graded.student)

    leaked = [l for l in lines if l in student_lines]
    assert not leaked, f"{graded.name}: solution/hidden-test lines survive in the student version: {leaked}"
    leaked_blocks = [b for b in blocks if b in text or json.dumps(b)[1:-1] in raw]
    assert not leaked_blocks, f"{graded.name}: solution/hidden-test text survives: {leaked_blocks}"
    for delim in SOLUTION_DELIMS + HIDDEN_DELIMS:
        assert delim not in raw, f"{graded.name}: {delim!r} survives in the student version"
    with_outputs = [i for i, c in enumerate(graded.student.cells) if c.get("outputs")]
    assert not with_outputs, f"{graded.name}: student version has outputs in cells {with_outputs}"


def test_leak_check_sees_solutions_and_hidden_tests():
    """The leak check itself: on the fixture it finds every marked solution/hidden line."""
    instructor = nbformat.read(FIXTURE, as_version=4)
    lines, blocks = protected_text(instructor)
    for i in (1, 2, 3):
        assert any(f"fixture-solution-marker-{i}" in l for l in lines)
        assert any(f"fixture-hidden-marker-{i}" in l for l in lines)
    assert len(blocks) == 6
    # the template line around a solution region is not protected
    assert not any(l.startswith("def cpl_of") for l in lines)


def test_student_version_keeps_every_exercise(graded):
    """Same answer and test cells, same order; visible asserts kept, answers stubbed."""
    ids = lambda nb, pred: [nbg(c)["grade_id"] for c in nb.cells if pred(c)]  # noqa: E731
    assert ids(graded.student, is_solution) == ids(graded.instructor, is_solution)
    assert ids(graded.student, is_grade) == ids(graded.instructor, is_grade)
    for cell in graded.student.cells:
        if is_solution(cell):
            assert "raise NotImplementedError()" in cell.source, (
                f"{graded.name}: answer cell {nbg(cell)['grade_id']} was not stubbed:\n{cell.source}"
            )
    for s_cell, i_cell in zip(
        (c for c in graded.student.cells if is_grade(c)), (c for c in graded.instructor.cells if is_grade(c))
    ):
        _, visible = split_regions(i_cell.source, *HIDDEN_DELIMS)
        assert s_cell.source.strip() == "\n".join(visible).strip()


# --------------------------------------------------------------------------- autograding


def test_autograde_runs_every_submission(graded):
    assert not graded.failures, "\n".join(graded.failures)
    for who in STUDENTS:
        assert (graded.name, who) in graded.csv_rows, f"no CSV row for {who}/{graded.name}"


def test_instructor_solutions_get_full_marks(graded):
    assert not graded.failures, "\n".join(graded.failures)
    score, max_score = graded.score("full")
    assert max_score == graded.max_points > 0
    lost = {gid: s for gid, s in graded.cells["full"].items() if s[0] != s[1]}
    assert score == max_score, (
        f"{graded.name}: solutions scored {score}/{max_score}; test cells losing points: {lost} "
        f"(executed copies: {graded.root / 'autograded'})"
    )


def test_untouched_student_version_gets_zero(graded):
    assert not graded.failures, "\n".join(graded.failures)
    score, max_score = graded.score("blank")
    scored = {gid: s for gid, s in graded.cells["blank"].items() if s[0]}
    assert score == 0 and max_score == graded.max_points, (
        f"{graded.name}: the untouched student version scored {score}/{max_score}; "
        f"these test cells pass without an answer: {scored} (executed copies: {graded.root / 'autograded'})"
    )
    timeouts = [
        nbg(c).get("grade_id") or i
        for i, c in enumerate(graded.autograded("blank").cells)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error" and o.get("ename") == "CellTimeoutError"
    ]
    assert not timeouts, f"{graded.name}: cells hit the {CELL_TIMEOUT}s timeout without an answer: {timeouts}"


def test_first_answer_only_gets_partial_marks(graded):
    assert not graded.failures, "\n".join(graded.failures)
    score, max_score = graded.score("partial")
    assert 0 < score < max_score, f"{graded.name}: first answer only scored {score}/{max_score}"
    assert graded.first_test, f"{graded.name}: no test cell after the first answer cell {graded.first_answer}"
    got, worth = graded.cells["partial"][graded.first_test]
    assert got == worth, (
        f"{graded.name}: with answer {graded.first_answer} filled in, its test cell "
        f"{graded.first_test} scored {got}/{worth}"
    )


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("path", CASES, ids=IDS)
def test_instructor_notebook_validates(path, tmp_path):
    cfg = course.load_config(tmp_path / "course", timeout=CELL_TIMEOUT)
    problems = course.validate(cfg, {path.stem: path})[path.stem]
    assert not problems, course.format_validation(path.stem, problems)


# --------------------------------------------------------------------------- machinery (fixture only)


def _fixture_with_answer(tmp_path, grade_id: str, source: str) -> Path:
    nb = nbformat.read(FIXTURE, as_version=4)
    for cell in nb.cells:
        if nbg(cell).get("grade_id") == grade_id:
            cell.source = source
    folder = tmp_path / "notebooks"
    folder.mkdir(exist_ok=True)
    out = folder / FIXTURE.name
    nbformat.write(nb, out)
    return out


def test_validate_command_fails_on_wrong_solution(tmp_path, capsys):
    """Unlike `nbgrader validate`, our validate command exits 1 when a solution fails."""
    bad = _fixture_with_answer(tmp_path, "sample_ex2_answer", "def is_privileged(m):\n    return False\n")
    rc = course.main(["--course", str(tmp_path / "course"), "--notebooks", str(bad.parent), "--timeout", "30", "validate"])
    out = capsys.readouterr()
    assert rc == 1, out
    assert "sample_ex2_test" in out.err or "is_privileged" in out.err, out.err


def test_endless_loop_in_an_answer_is_interrupted(tmp_path):
    """A student's endless loop ends at the per-cell timeout; the rest is still graded."""
    cfg = course.load_config(tmp_path / "course", timeout=3)
    name = FIXTURE.stem
    release = course.generate(cfg, {name: FIXTURE})[name]
    instructor = nbformat.read(FIXTURE, as_version=4)
    nb = submission_from(nbformat.read(release, as_version=4), instructor)
    for cell in nb.cells:
        if nbg(cell).get("grade_id") == "sample_ex1_answer":
            cell.source = "def cpl_of(selector):\n    return 0\nwhile True:\n    pass\n"
    out = tmp_path / "subs" / "looper" / name / f"{name}.ipynb"
    out.parent.mkdir(parents=True)
    nbformat.write(nb, out)
    failures = course.autograde(cfg, course.collect(cfg, tmp_path / "subs"), FIXTURE.parent)
    assert not failures, failures
    rows = read_csv(course.export_csv(cfg, tmp_path / "grades.csv"))
    grades = cell_grades(cfg, name, "looper")
    assert grades["sample_ex1_test"][0] == 0
    assert grades["sample_ex2_test"] == (3, 3) and grades["sample_ex3_test"] == (1, 1)
    assert float(rows[(name, "looper")]["score"]) == 4


def _vtlab_loops_notebook() -> nbformat.NotebookNode:
    """A two-exercise nbgrader notebook on vtlab's public API: run a guest, handle CPUID."""

    def meta(gid, **kw):
        m = {"grade": False, "grade_id": gid, "locked": False, "schema_version": 3, "solution": False, "task": False}
        m.update(kw)
        return {"nbgrader": m}

    cells = [
        ("from vtlab import VirtualMachine, ExitReason, VmState", meta("loops_setup", locked=True)),
        (
            "def run_guest():\n    ### BEGIN SOLUTION\n"
            "    vm = VirtualMachine('mov eax, 1\\nhlt', mode='real')\n"
            "    return vm.run(max_instructions=1000)\n    ### END SOLUTION",
            meta("loops_ex1_answer", solution=True),
        ),
        ("assert run_guest().state is VmState.HALTED", meta("loops_ex1_test", grade=True, locked=True, points=1)),
        (
            "def install(vm):\n    @vm.handler(ExitReason.CPUID)\n    def on_cpuid(vm, exit):\n"
            "        ### BEGIN SOLUTION\n        vm.skip_instruction()\n        return True\n        ### END SOLUTION",
            meta("loops_ex2_answer", solution=True),
        ),
        (
            "vm = VirtualMachine('mov eax, 0\\ncpuid\\nhlt', mode='real')\ninstall(vm)\n"
            "assert vm.run(max_exits=10).state is VmState.HALTED",
            meta("loops_ex2_test", grade=True, locked=True, points=1),
        ),
    ]
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    for src, md in cells:
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata.update(md)
        nb.cells.append(cell)
    return nb


def test_runaway_guest_and_handler_do_not_hang_the_autograder(tmp_path):
    """The issue's promise: a guest that never stops ends with vtlab's budget error, a
    handler that never returns is interrupted at the cell timeout; grading goes on."""
    pytest.importorskip("vtlab")
    name = "vtlab_loops"
    src = tmp_path / "notebooks" / f"{name}.ipynb"
    src.parent.mkdir()
    instructor = _vtlab_loops_notebook()
    nbformat.write(instructor, src)
    cfg = course.load_config(tmp_path / "course", timeout=5)
    release = course.generate(cfg, {name: src})[name]
    student = nbformat.read(release, as_version=4)
    looper = submission_from(student, instructor)
    for cell in looper.cells:
        gid = nbg(cell).get("grade_id")
        if gid == "loops_ex1_answer":  # no budget given: vtlab's default budget ends it
            cell.source = "def run_guest():\n    return VirtualMachine('spin: jmp spin', mode='real').run()"
        elif gid == "loops_ex2_answer":  # a handler that never returns
            cell.source = (
                "def install(vm):\n    @vm.handler(ExitReason.CPUID)\n    def on_cpuid(vm, exit):\n"
                "        while True:\n            pass"
            )
    for who, nb in {"solved": submission_from(student, instructor), "looper": looper}.items():
        out = tmp_path / "subs" / who / name / f"{name}.ipynb"
        out.parent.mkdir(parents=True)
        nbformat.write(nb, out)
    failures = course.autograde(cfg, course.collect(cfg, tmp_path / "subs"), src.parent)
    assert not failures, failures
    assert cell_grades(cfg, name, "solved") == {"loops_ex1_test": (1, 1), "loops_ex2_test": (1, 1)}
    assert cell_grades(cfg, name, "looper") == {"loops_ex1_test": (0, 1), "loops_ex2_test": (0, 1)}
    errors = {
        nbg(c).get("grade_id"): o.get("ename")
        for c in nbformat.read(tmp_path / "course" / "autograded" / "looper" / name / f"{name}.ipynb", as_version=4).cells
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    }
    assert errors.get("loops_ex1_test") == "AssertionError", errors  # budget state, not a hang
    assert errors.get("loops_ex2_test") in ("KeyboardInterrupt", "CellTimeoutError"), errors


def test_command_line_generate_and_autograde(tmp_path, capsys):
    """The commands behind `make assignments` and `make autograde SUBMISSIONS=dir`."""
    course_dir, name = tmp_path / "course", FIXTURE.stem
    common = ["--course", str(course_dir), "--notebooks", str(FIXTURE.parent), "--timeout", "30"]
    assert course.main(common + ["generate"]) == 0, capsys.readouterr()
    release = course_dir / "release" / name / f"{name}.ipynb"
    assert release.exists()
    assert (course_dir / "source" / name / f"{name}.ipynb").read_bytes() == FIXTURE.read_bytes()
    sub = tmp_path / "subs" / "alice" / name / f"{name}.ipynb"
    sub.parent.mkdir(parents=True)
    sub.write_bytes(release.read_bytes())
    assert course.main(common + ["autograde", str(tmp_path / "subs")]) == 0, capsys.readouterr()
    rows = read_csv(course_dir / "grades.csv")
    assert float(rows[(name, "alice")]["score"]) == 0
    assert (course_dir / "autograded" / "alice" / name / f"{name}.ipynb").exists()
    # a folder with no submissions is an error, not a silent success
    (tmp_path / "empty").mkdir()
    assert course.main(common + ["autograde", str(tmp_path / "empty")]) == 1
    # `learner` copies the release byte for byte (make notebooks: notebooks/ = release)
    learner_dir = tmp_path / "learner"
    assert course.main(common + ["--learner", str(learner_dir), "learner", name]) == 0, capsys.readouterr()
    assert (learner_dir / f"{name}.ipynb").read_bytes() == release.read_bytes()
    assert [p.name for p in learner_dir.iterdir()] == [f"{name}.ipynb"]


def test_learner_command_needs_a_release(tmp_path, capsys):
    common = ["--course", str(tmp_path / "course"), "--notebooks", str(FIXTURE.parent)]
    assert course.main(common + ["--learner", str(tmp_path / "out"), "learner"]) == 1
    assert "run the generate command first" in capsys.readouterr().err


def test_make_targets_call_the_course_tool():
    out = subprocess.run(
        ["make", "-n", "assignments", "autograde", "SUBMISSIONS=some/dir"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert "tools/nbgrader_course.py" in out and " generate" in out, out
    # make autograde runs the course tool's autograde or the isolated grader tools/autograde.py
    assert re.search(r"(nbgrader_course\.py autograde|tools/autograde\.py) [\"']?some/dir", out), out
    # make notebooks: sync each pair first, then generate from course/source, then copy
    out = subprocess.run(["make", "-n", "notebooks"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if "jupytext" in l or "nbgrader_course.py" in l]
    assert len(lines) == 3, out
    assert "jupytext --sync" in lines[0] and "course/source/01_rings/01_rings.ipynb" in lines[0], lines
    assert lines[1].endswith("nbgrader_course.py generate") and lines[2].endswith("nbgrader_course.py learner"), lines
