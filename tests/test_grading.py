"""tools/autograde.py: grading that holds against the cheats a learner can make.

The unit tests read code and command lines (no kernel). The class tests - marked
``nbgrader``, which tests/conftest.py leaves out of ``make check`` - grade a small fixture
course, tests/fixtures/grading/source/tiny/ (two answer cells, each followed by a test
cell with visible and hidden tests), exactly as an instructor would: ``autograde.py`` on
a folder of submissions, then grades.csv and attention.csv are read back. One more test
grades a real assignment from course/source/ with its own solutions and with the blank
learner version.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import autograde  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*not in session")

FIXTURE_SOURCE = REPO / "tests" / "fixtures" / "grading" / "source"
PY = sys.executable


# =========================================================================== static scan
def test_scan_names_the_input_transformer_cheat():
    reasons = autograde.scan_source("get_ipython().input_transformers_cleanup.append(lambda lines: [])")
    assert any("input transformer" in r for r in reasons), reasons
    assert any("get_ipython" in r for r in reasons), reasons


@pytest.mark.parametrize("code", [
    "import json\nnb = json.load(open('../../source/tiny/tiny.ipynb'))",
    "from pathlib import Path\nnb = (Path('..') / '..' / 'source' / 'tiny' / 'tiny.ipynb').read_text()",
    "import glob\nfiles = glob.glob('/home/**/tiny.ipynb', recursive=True)",
])
def test_scan_names_reading_the_instructor_source(code):
    reasons = autograde.scan_source(code)
    assert any("outside its folder" in r or "course's files" in r for r in reasons), reasons


@pytest.mark.parametrize("code, words", [
    ("import os\nos._exit(0)", "os._exit"),
    ("from os import _exit\n_exit(1)", "os._exit"),
    ("import sys\nsys.modules['vtlab'] = None", "sys.modules"),
    ("exec(open('x').read())", "exec()"),
    ("!cat ../../source/tiny/tiny.ipynb", "shell command"),
    ("%run ../../source/tiny/tiny.ipynb", "%run"),
    ("import builtins\nbuiltins.print = lambda *a: None", "builtins"),
    ("ip = get_ipython()\nip.ast_transformers.append(object())", "AST transformer"),
    ("import sys\nsys.excepthook = lambda *a: None", "excepthook"),
])
def test_scan_names_other_code_that_touches_the_grader(code, words):
    reasons = autograde.scan_source(code)
    assert any(words in r for r in reasons), (code, reasons)


@pytest.mark.parametrize("code", [
    "def rpl(selector):\n    return selector & 0b11",
    "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])",
    "from vtlab import VirtualMachine\nvm = VirtualMachine('hlt', mode='real')\nprint(vm.run())",
    "with open('notes.txt', 'w') as f:\n    f.write('mine')",
    "import pandas as pd\ndf = pd.DataFrame({'a': [1]})\ndf.describe()",
])
def test_scan_is_quiet_on_honest_answers(code):
    assert autograde.scan_source(code) == []


def test_scan_reports_a_cell_it_cannot_read():
    (reason,) = autograde.scan_source("def f(:\n    pass")
    assert "not valid Python" in reason and "line 1" in reason


def test_scan_notebook_names_the_cell():
    nb = {"cells": [
        {"cell_type": "code", "source": "x = 1", "metadata": {"nbgrader": {"grade_id": "ex1_test", "grade": True,
                                                                           "solution": False, "locked": True}}},
        {"cell_type": "code", "source": "import os; os._exit(0)",
         "metadata": {"nbgrader": {"grade_id": "ex1_answer", "solution": True, "grade": False}}},
        {"cell_type": "code", "source": "import ctypes", "metadata": {}},
    ]}
    reasons = autograde.scan_notebook(nb)
    assert any("'ex1_answer'" in r and "os._exit" in r for r in reasons), reasons
    assert any("#3 (added by the student)" in r and "ctypes" in r for r in reasons), reasons
    assert not any("ex1_test" in r for r in reasons)
    # Code the learner version itself holds (the course's demonstrations) is not the student's.
    learner = {"cells": [nb["cells"][2]]}
    assert not any("#3" in r for r in autograde.scan_notebook(nb, learner))


# =========================================================================== test cells
def _fixture_nb() -> dict:
    """The fixture's instructor source as nbformat reads it (sources as strings)."""
    import nbformat

    return json.loads(json.dumps(nbformat.read(FIXTURE_SOURCE / "tiny" / "tiny.ipynb", as_version=4)))


def _learner_version(nb: dict) -> dict:
    """The learner version as nbgrader makes it (ClearHiddenTests, ComputeChecksums)."""
    import nbformat
    from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions, ComputeChecksums

    node = nbformat.from_dict(copy.deepcopy(nb))
    for pp in (ClearSolutions(), ClearHiddenTests(), ComputeChecksums()):
        node, _ = pp.preprocess(node, {})
    return json.loads(json.dumps(node))


def _cell(nb: dict, grade_id: str) -> dict:
    return next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)


def test_deleted_and_altered_test_cells_are_found_by_checksum():
    learner = _learner_version(_fixture_nb())
    assert autograde.check_test_cells(copy.deepcopy(learner), learner) == []
    sub = copy.deepcopy(learner)
    sub["cells"] = [c for c in sub["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") != "ex1_test"]
    _cell(sub, "ex2_test")["source"] = "pass"
    # The student's copy of the checksum is not trusted: forging it changes nothing.
    _cell(sub, "ex2_test")["metadata"]["nbgrader"]["checksum"] = "0" * 32
    assert autograde.check_test_cells(sub, learner) == ["test cell 'ex1_test' deleted", "test cell 'ex2_test' altered"]


def test_answers_do_not_count_as_altered_tests():
    learner = _learner_version(_fixture_nb())
    sub = copy.deepcopy(learner)
    _cell(sub, "ex1_answer")["source"] = "def rpl(s):\n    return s & 3"
    assert autograde.check_test_cells(sub, learner) == []


def _marked():
    import nbformat

    nb = nbformat.from_dict(_fixture_nb())
    marked = copy.deepcopy(nb)
    autograde._mark_tests(marked, "feedc0de")
    return nb, marked


def test_token_lines_keep_a_partial_credit_expression_last():
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("score = 0.5\nscore")
    cell.metadata.nbgrader = {"grade": True, "solution": False, "grade_id": "t", "points": 1, "locked": True}
    nb.cells.append(cell)
    autograde._mark_tests(nb, "abc")
    assert nb.cells[0].source.split("\n") == ["score = 0.5", f"print({autograde.TOKEN_PREFIX + 'abc'!r})", "score"]


def test_a_test_cell_without_its_token_gets_zero():
    import nbformat

    _, marked = _marked()
    ran = copy.deepcopy(marked)
    for cell in ran.cells:
        if autograde.is_test_cell(cell):
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout",
                                                   text=f"hello\n{autograde.TOKEN_PREFIX}feedc0de\n")]
    assert autograde._unmark_tests(ran, marked, "feedc0de") == []
    test = _cell(json.loads(json.dumps(ran)), "ex1_test")
    assert autograde.TOKEN_PREFIX not in test["source"] and "BEGIN HIDDEN TESTS" in test["source"]
    assert [o["text"] for o in test["outputs"]] == ["hello\n"]

    blanked = copy.deepcopy(marked)  # what an input transformer that blanks cells leaves
    forged = copy.deepcopy(marked)   # printing a token of its own does not help
    for cell in forged.cells:
        if autograde.is_test_cell(cell):
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{autograde.TOKEN_PREFIX}0000\n")]
    for nb in (blanked, forged):
        assert autograde._unmark_tests(nb, marked, "feedc0de") == ["ex1_test", "ex2_test"]
        assert [o["ename"] for o in _cell(json.loads(json.dumps(nb)), "ex1_test")["outputs"]] == ["GraderCheck"]

    failed = copy.deepcopy(marked)  # an ordinary failing test needs no note
    for cell in failed.cells:
        if autograde.is_test_cell(cell):
            cell.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="", traceback=[])]
    assert autograde._unmark_tests(failed, marked, "feedc0de") == []


# =========================================================================== containers
def test_docker_command_line_mounts_only_the_submission_folder(tmp_path):
    script = tmp_path / "autograde.py"
    cmd = autograde.docker_command(tmp_path / "0001", image="vtlab-course:2026-12-03", timeout=120,
                                   uid=1000, gid=100, script=script, name="vtlab-grade-x")
    assert cmd[:6] == ["docker", "run", "--rm", "-i", "--name", "vtlab-grade-x"]
    joined = " ".join(cmd)
    for part in ["--network none", "--cap-drop ALL", "--security-opt no-new-privileges", "--read-only",
                 "--user 1000:100", "--workdir /grading", f"--volume {tmp_path / '0001'}:/grading:rw",
                 f"--volume {script}:/opt/vtlab-grader/autograde.py:ro", "--env HOME=/grading",
                 "--env IPYTHONDIR=/grading/.ipython", "--env JUPYTER_RUNTIME_DIR=/grading/.runtime"]:
        assert part in joined, part
    volumes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--volume"]
    assert len(volumes) == 2, "nothing but the folder and the script goes into the container"
    assert cmd[-7:] == ["--entrypoint", "python", "vtlab-course:2026-12-03", "/opt/vtlab-grader/autograde.py",
                        "worker", "--timeout", "120"]


def test_docker_never_runs_the_submission_as_root(tmp_path):
    (tmp_path / "w").mkdir()
    cmd = autograde.docker_command(tmp_path / "w", image="i", timeout=5, uid=0, gid=0)
    assert cmd[cmd.index("--user") + 1] == "1000:100"


def test_container_always_without_a_daemon_says_so(monkeypatch):
    monkeypatch.setattr(autograde, "docker_available", lambda docker="docker": False)
    with pytest.raises(autograde.GradingError, match="Docker daemon does not answer"):
        autograde.isolation_mode("always")
    monkeypatch.setattr(autograde, "namespaces_available", lambda: False)
    assert autograde.isolation_mode("auto") == "process"
    assert autograde.isolation_mode("never", namespaces=False) == "process"


def test_docker_available_matches_docker_info():
    if shutil.which("docker") is None:
        assert autograde.docker_available() is False
        return
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    assert autograde.docker_available() is (r.returncode == 0 and bool(r.stdout.strip()))


def test_the_sandbox_hides_the_repository_but_not_the_package():
    hidden = autograde.default_hidden()
    assert REPO / "course" in hidden or not (REPO / "course").is_dir()
    assert REPO / ".git" in hidden or not (REPO / ".git").is_dir()
    assert REPO / "tests" in hidden and REPO / "tools" in hidden
    assert REPO / "vtlab" not in hidden and REPO / ".venv" not in hidden


def test_bad_usage_is_explained(tmp_path):
    r = subprocess.run([PY, str(REPO / "tools" / "autograde.py"), str(tmp_path / "nowhere")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = subprocess.run([PY, str(REPO / "tools" / "autograde.py"), str(tmp_path / "empty")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "<student>/<assignment>/<assignment>.ipynb" in r.stderr


# =========================================================================== a class
ANSWERS = {
    "full": {"ex1_answer": "def rpl(s):\n    return s & 3", "ex2_answer": "def index(s):\n    return s >> 3"},
    "blank": {},
    # right on the visible test of exercise 1 only, wrong on its hidden ones; exercise 2 right
    "partial": {"ex1_answer": "def rpl(s):\n    return 0 if s == 8 else 3", "ex2_answer": "def index(s):\n    return s >> 3"},
    # (a) an input transformer that blanks every later cell: the tests never run
    "cheat_transformer": {"ex1_answer": "get_ipython().input_transformers_cleanup.append(lambda lines: [])"},
    # (b) the instructor source, opened from where nbgrader's own layout would put it ...
    "cheat_open": {"ex1_answer": (
        "import json\n"
        "nb = json.load(open('../../source/tiny/tiny.ipynb'))\n"
        "for c in nb['cells']:\n"
        "    if c['metadata'].get('nbgrader', {}).get('solution'):\n"
        "        exec(''.join(c['source']))")},
    # ... or found by a glob over the whole machine's course folders (absolute path)
    "cheat_glob": {"ex1_answer": (
        "import glob, json\n"
        "for f in glob.glob(COURSE_PARENT + '/**/source/tiny/tiny.ipynb', recursive=True):\n"
        "    for c in json.load(open(f))['cells']:\n"
        "        if c['metadata'].get('nbgrader', {}).get('solution'):\n"
        "            exec(''.join(c['source']))")},
    "deleted_test": {"ex1_answer": "def rpl(s):\n    return s & 3", "ex2_answer": "def index(s):\n    return s >> 3"},
    "altered_test": {"ex1_answer": "def rpl(s):\n    return 0", "ex2_answer": "def index(s):\n    return s >> 3"},
    "dies": {"ex1_answer": "import os\nos._exit(3)"},
    # writes into the venv, to change how every later submission's tests run
    "tamper": {"ex1_answer": ("import sys, pathlib\n"
                              "pathlib.Path(sys.prefix, 'vtlab-grader-probe.txt').write_text('x')\n"
                              "def rpl(s):\n    return s & 3"),
               "ex2_answer": "def index(s):\n    return s >> 3"},
    # an endless loop: nbgrader's cell time-out (--timeout 10 below) interrupts it
    "loops": {"ex1_answer": "import time\nwhile True:\n    time.sleep(0.5)",
              "ex2_answer": "def index(s):\n    return s >> 3"},
}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """Grade the fixture class once (JOBS=2); returns (grades by student, attention by
    student, the command's output, the course root)."""
    root = tmp_path_factory.mktemp("grading")
    course = root / "course"
    shutil.copytree(FIXTURE_SOURCE, course / "source")
    c = autograde.Course(course, log=lambda s: None)
    c.ensure_assignment("tiny")
    learner = json.loads(c.release("tiny").read_text(encoding="utf-8"))
    subs = root / "submitted"
    for student, answers in ANSWERS.items():
        nb = copy.deepcopy(learner)
        for cell in nb["cells"]:
            gid = cell["metadata"].get("nbgrader", {}).get("grade_id")
            if gid in answers:
                cell["source"] = answers[gid].replace("COURSE_PARENT", repr(str(root)))
        if student == "deleted_test":
            nb["cells"] = [x for x in nb["cells"] if x["metadata"].get("nbgrader", {}).get("grade_id") != "ex2_test"]
        if student == "altered_test":
            _cell(nb, "ex1_test")["source"] = "assert True"
        (subs / student / "tiny").mkdir(parents=True)
        (subs / student / "tiny" / "tiny.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    env = dict(os.environ, JOBS="2")
    r = subprocess.run([PY, str(REPO / "tools" / "autograde.py"), str(subs), "--course", str(course),
                        "--container", "never", "--timeout", "10", "--feedback"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(course / "grades.csv", encoding="utf-8") as f:
        grades = {row["student_id"]: row for row in csv.DictReader(f)}
    with open(course / "attention.csv", encoding="utf-8") as f:
        attention = {row["student"]: row for row in csv.DictReader(f)}
    return grades, attention, r.stdout, course


pytestmark_class = pytest.mark.nbgrader


@pytestmark_class
def test_progress_lines_and_a_rate(graded_class):
    _, _, out, _ = graded_class
    n = len(ANSWERS)
    assert re.search(rf"^graded {n}/{n} \S+/tiny: ", out, re.M), out
    assert len(re.findall(r"^graded \d+/\d+ ", out, re.M)) == n
    assert re.search(r"\d+(\.\d+)? per minute", out)
    assert "isolation:" in out


@pytestmark_class
def test_a_correct_submission_gets_full_marks_and_no_attention(graded_class):
    grades, attention, _, _ = graded_class
    assert float(grades["full"]["score"]) == 3.0 and float(grades["full"]["max_score"]) == 3.0
    assert "full" not in attention


@pytestmark_class
def test_a_blank_submission_gets_zero(graded_class):
    grades, attention, _, _ = graded_class
    assert float(grades["blank"]["score"]) == 0.0
    assert "blank" not in attention, "an untouched learner version needs no attention"


@pytestmark_class
def test_hidden_tests_count(graded_class):
    grades, _, _, _ = graded_class
    # exercise 1 passes its visible asserts but fails a hidden one: only exercise 2's point
    assert float(grades["partial"]["score"]) == 1.0


@pytestmark_class
def test_the_input_transformer_cheat_gets_nothing_and_is_named(graded_class):
    grades, attention, _, _ = graded_class
    assert float(grades["cheat_transformer"]["score"]) == 0.0
    reasons = attention["cheat_transformer"]["reasons"]
    assert "input transformer" in reasons
    assert "did not run to their end (0 marks): ex1_test, ex2_test" in reasons


@pytestmark_class
@pytest.mark.parametrize("student", ["cheat_open", "cheat_glob"])
def test_reading_the_instructor_source_gets_nothing_and_is_named(graded_class, student):
    grades, attention, out, _ = graded_class
    reasons = attention[student]["reasons"]
    assert "outside its folder" in reasons and "exec()" in reasons
    if student == "cheat_open" or "isolation: a separate process" not in out:
        # The relative path does not exist in the grading folder; the absolute one is
        # hidden by the namespace sandbox or the container.
        assert float(grades[student]["score"]) == 0.0


@pytestmark_class
def test_deleted_and_altered_test_cells_are_reported_and_graded_with_the_real_tests(graded_class):
    grades, attention, _, _ = graded_class
    assert "test cell 'ex2_test' deleted" in attention["deleted_test"]["reasons"]
    assert float(grades["deleted_test"]["score"]) == 3.0  # nbgrader puts the instructor's test back
    assert "test cell 'ex1_test' altered" in attention["altered_test"]["reasons"]
    assert float(grades["altered_test"]["score"]) == 1.0  # the instructor's test ran, not "assert True"


@pytestmark_class
def test_a_kernel_that_calls_os_exit_is_a_dead_kernel(graded_class):
    grades, attention, _, _ = graded_class
    row = attention["dies"]
    assert row["status"] == "dead kernel"
    assert "dead kernel" in row["reasons"] and "os._exit" in row["reasons"]
    assert float(grades["dies"]["score"]) == 0.0


@pytestmark_class
def test_a_submission_cannot_change_the_environment_of_the_next(graded_class):
    grades, _, out, _ = graded_class
    probe = Path(sys.prefix) / "vtlab-grader-probe.txt"
    if "isolation: a separate process" in out:
        probe.unlink(missing_ok=True)
        pytest.skip("no namespaces or container here: a plain process can write the venv")
    assert not probe.exists(), "a submission wrote into the venv"
    assert float(grades["tamper"]["score"]) == 1.0  # its write failed, so exercise 1 did


@pytestmark_class
def test_an_endless_loop_is_interrupted_and_reported(graded_class):
    grades, attention, _, _ = graded_class
    assert "a cell timed out ('ex1_answer')" in attention["loops"]["reasons"]
    assert float(grades["loops"]["score"]) == 1.0  # the rest of the notebook still ran


@pytestmark_class
def test_feedback_shows_no_hidden_test(graded_class):
    _, _, _, course = graded_class
    import html as html_lib

    page = (course / "feedback" / "partial" / "tiny" / "tiny.html").read_text(encoding="utf-8")
    html = html_lib.unescape(re.sub(r"<[^>]+>", "", page))  # the text, without highlighting spans
    assert "failed: 0 of 2 points" in html and "passed: 1 of 1 points" in html
    assert "assert rpl(0x23) == 3" in html, "the visible tests are shown"
    for hidden in ("tiny-hidden-1", "rpl(0x11)", "0x1FFF", "BEGIN HIDDEN TESTS", "AssertionError", "Traceback"):
        assert hidden not in html, hidden


@pytestmark_class
def test_the_graded_notebook_keeps_no_token_and_the_gradebook_is_the_parents(graded_class):
    _, _, _, course = graded_class
    text = (course / "autograded" / "cheat_transformer" / "tiny" / "tiny.ipynb").read_text(encoding="utf-8")
    assert autograde.TOKEN_PREFIX not in text
    assert "GraderCheck" in text
    assert (course / "gradebook.db").is_file()


# =========================================================================== a real assignment
def _real_assignment() -> Path | None:
    """The smallest instructor source in course/source/ (None when there is none yet)."""
    found = sorted((REPO / "course" / "source").glob("*/*.ipynb"), key=lambda p: p.stat().st_size)
    found = [p for p in found if p.stem == p.parent.name]
    return found[0] if found else None


def _solution_of(learner: dict, source: dict) -> dict:
    """The learner version with each answer cell replaced by the source's solution."""
    solutions = {}
    for cell in source["cells"]:
        m = cell["metadata"].get("nbgrader", {})
        if m.get("solution"):
            text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            text = "\n".join(line for line in text.split("\n")
                             if not re.match(r"\s*### (BEGIN|END) SOLUTION\s*$", line))
            solutions[m["grade_id"]] = text
    out = copy.deepcopy(learner)
    for cell in out["cells"]:
        gid = cell["metadata"].get("nbgrader", {}).get("grade_id")
        if gid in solutions:
            cell["source"] = solutions[gid]
    return out


@pytest.mark.nbgrader
def test_a_real_assignment_solution_full_marks_blank_zero(tmp_path):
    src = _real_assignment()
    if src is None:
        pytest.skip("no instructor source in course/source/ yet")
    name = src.stem
    course = tmp_path / "course"
    shutil.copytree(src.parent, course / "source" / name,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    c = autograde.Course(course, log=lambda s: None)
    c.ensure_assignment(name)
    learner = json.loads(c.release(name).read_text(encoding="utf-8"))
    assert not list(c.release(name).parent.glob("*.py")), "the jupytext twin (solutions) reached release/"
    source = json.loads(src.read_text(encoding="utf-8"))
    for student, nb in (("solution", _solution_of(learner, source)), ("blank", learner)):
        (tmp_path / "in" / student / name).mkdir(parents=True)
        (tmp_path / "in" / student / name / f"{name}.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    results = autograde.grade_class(course, autograde.find_submissions(tmp_path / "in"), jobs=2,
                                    container="never", progress=lambda s: None)
    by = {r.student: r for r in results}
    assert by["solution"].max_score > 0
    assert by["solution"].score == by["solution"].max_score, by["solution"].reasons
    assert by["blank"].score == 0, by["blank"].reasons
    assert by["solution"].status == by["blank"].status == "ok"
