"""The course works with nbgrader 0.9: student versions, autograding, validation.

Runs on every notebook in ``notebooks/`` that carries nbgrader metadata, plus the small
fixture ``tests/fixtures/nbgrader_sample.ipynb`` (so the machinery is tested even before
the course notebooks exist). For each notebook, in a course directory of its own under
a temp dir, through ``tools/nbgrader_course.py`` (the code behind ``make assignments``
and ``make autograde``):

- the student version carries no solution text and no hidden test;
- three submissions are autograded: the instructor's solutions (full marks), the
  untouched student version (zero, no crash, no timeout) and the student version with
  only the first answer filled in (partial marks); scores are read from the exported
  CSV and per cell from the gradebook;
- ``nbgrader.validator.Validator`` passes on the instructor notebook (the
  ``nbgrader validate`` CLI exits 0 even when cells fail, so it is not used).

Select with ``pytest -m nbgrader``.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import nbgrader_course as course  # noqa: E402

NOTEBOOKS_DIR = REPO / "notebooks"
FIXTURE = REPO / "tests" / "fixtures" / "nbgrader_sample.ipynb"

COURSE_NOTEBOOKS = (
    [p for p in sorted(NOTEBOOKS_DIR.glob("*.ipynb")) if course.has_nbgrader_metadata(p)]
    if NOTEBOOKS_DIR.is_dir()
    else []
)
CASES = COURSE_NOTEBOOKS + [FIXTURE]
IDS = [p.stem for p in CASES]

# Per-cell timeout while autograding/validating in these tests. A course notebook runs
# top to bottom in well under a minute, so a cell that takes this long is a hang.
CELL_TIMEOUT = 60

STUDENTS = ("full", "blank", "partial")

SOLUTION_DELIMS = ("BEGIN SOLUTION", "END SOLUTION")
HIDDEN_DELIMS = ("BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
STUB_LINES = {"# YOUR CODE HERE", "raise NotImplementedError()", "YOUR ANSWER HERE"}

pytestmark = [
    pytest.mark.nbgrader,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*not in session.*"),
]


# --------------------------------------------------------------------------- helpers


def nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_solution(cell) -> bool:
    return bool(nbg(cell).get("solution"))


def is_grade(cell) -> bool:
    return bool(nbg(cell).get("grade"))


def split_regions(source: str, begin: str, end: str) -> tuple[list[list[str]], list[str]]:
    """(regions, outside lines) of *source*, delimited the way nbgrader does it
    (a line containing *begin* opens a region, one containing *end* closes it)."""
    regions, outside, current = [], [], None
    for line in source.split("\n"):
        if begin in line:
            current = []
        elif end in line and current is not None:
            regions.append(current)
            current = None
        elif current is not None:
            current.append(line)
        else:
            outside.append(line)
    return regions, outside


def protected_text(instructor) -> tuple[list[str], list[str]]:
    """Lines (stripped) that are solution or hidden-test text and nothing else, and the
    full text of each region. A line that also appears outside every region of the
    instructor notebook (e.g. a ``return True`` the template already has) is not
    protected: the student version legitimately contains it."""
    inside, outside, blocks = [], set(), []
    for cell in instructor.cells:
        src = cell.source
        sol_regions, rest = split_regions(src, *SOLUTION_DELIMS)
        hidden_regions, rest = split_regions("\n".join(rest), *HIDDEN_DELIMS)
        for region in sol_regions + hidden_regions:
            inside.extend(region)
            text = "\n".join(region).strip()
            if text:
                blocks.append(text)
        outside.update(line.strip() for line in rest)
    lines = sorted({l.strip() for l in inside} - outside - STUB_LINES - {""})
    outside_text = "\n".join(sorted(outside))
    blocks = [b for b in blocks if b not in outside_text]
    return lines, blocks


def cell_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(json.dumps(out))
    return "\n".join(parts)


def submission_from(student, instructor, grade_ids=None):
    """The student version with the instructor's source pasted into the answer cells
    whose grade_id is in *grade_ids* (all answer cells if None)."""
    by_id = {nbg(c)["grade_id"]: c for c in instructor.cells if is_solution(c)}
    nb = copy.deepcopy(student)
    for cell in nb.cells:
        gid = nbg(cell).get("grade_id")
        if is_solution(cell) and (grade_ids is None or gid in grade_ids):
            cell.source = by_id[gid].source
    return nb


def read_csv(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(row["assignment"], row["student_id"]): row for row in csv.DictReader(f)}


def cell_grades(cfg, name: str, student: str) -> dict[str, tuple[float, float]]:
    from nbgrader.api import Gradebook

    cd = course._coursedir(cfg)
    with Gradebook(cd.db_url, cd.course_id) as gb:
        sub = gb.find_submission_notebook(name, name, student)
        return {g.name: (g.score, g.max_score) for g in sub.grades}


@dataclass
class Graded:
    name: str
    path: Path
    cfg: object
    root: Path
    instructor: nbformat.NotebookNode
    student: nbformat.NotebookNode
    release_path: Path
    failures: list
    csv_rows: dict
    cells: dict = field(default_factory=dict)  # student -> grade_id -> (score, max)
    first_answer: str = ""
    first_test: str = ""

    @property
    def max_points(self) -> float:
        return float(sum(nbg(c).get("points", 0) for c in self.instructor.cells if is_grade(c)))

    def score(self, student: str) -> tuple[float, float]:
        row = self.csv_rows[(self.name, student)]
        return float(row["score"]), float(row["max_score"])

    def autograded(self, student: str) -> nbformat.NotebookNode:
        return nbformat.read(self.root / "autograded" / student / self.name / f"{self.name}.ipynb", as_version=4)


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def graded(request, tmp_path_factory) -> Graded:
    """Generate the student version and autograde full / blank / partial submissions."""
    path = request.param
    name = path.stem
    base = tmp_path_factory.mktemp(f"nbgrader-{name}")
    cfg = course.load_config(base / "course", timeout=CELL_TIMEOUT)
    release_path = course.generate(cfg, {name: path})[name]

    instructor = nbformat.read(path, as_version=4)
    student = nbformat.read(release_path, as_version=4)
    answers = [c for c in instructor.cells if is_solution(c)]
    assert answers, f"{path.name}: no answer cells (nbgrader metadata solution: true)"
    first_answer = nbg(answers[0])["grade_id"]
    first_index = next(i for i, c in enumerate(instructor.cells) if nbg(c).get("grade_id") == first_answer)
    first_test = next((nbg(c)["grade_id"] for c in instructor.cells[first_index:] if is_grade(c)), "")

    subs = base / "submissions"
    submissions = {
        "full": submission_from(student, instructor),
        "blank": copy.deepcopy(student),
        "partial": submission_from(student, instructor, {first_answer}),
    }
    for who, nb in submissions.items():
        out = subs / who / name / f"{name}.ipynb"
        out.parent.mkdir(parents=True)
        nbformat.write(nb, out)

    pairs = course.collect(cfg, subs)
    failures = course.autograde(cfg, pairs, path.parent)
    csv_path = course.export_csv(cfg, base / "course" / "grades.csv")
    g = Graded(
        name=name,
        path=path,
        cfg=cfg,
        root=base / "course",
        instructor=instructor,
        student=student,
        release_path=release_path,
        failures=failures,
        csv_rows=read_csv(csv_path),
        first_answer=first_answer,
        first_test=first_test,
    )
    if not failures:
        g.cells = {who: cell_grades(cfg, name, who) for who in STUDENTS}
    return g


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


def test_make_targets_call_the_course_tool():
    out = subprocess.run(
        ["make", "-n", "assignments", "autograde", "SUBMISSIONS=some/dir"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert "tools/nbgrader_course.py" in out and " generate" in out, out
    assert re.search(r"nbgrader_course\.py autograde [\"']?some/dir", out), out
