"""The learner versions come first, and they are exactly what nbgrader makes from the sources.

Layout (docs/NOTEBOOKS.md): the instructor sources ``course/source/<a>/<a>.ipynb``, each
paired by jupytext with ``<a>.py``; the learner versions ``notebooks/<a>.ipynb``, which
``make notebooks`` writes from ``nbgrader generate_assignment``'s release.

Fast checks (part of ``make check``):

- the learner versions carry no solution or hidden-test markers, the sources do;
- each learner version equals, cell by cell (type, id, source, metadata), what
  ``generate_assignment`` makes from its source now, and the release holds no copy of
  the jupytext script (which has the solutions);
- each source's ``.ipynb`` and ``.py`` say the same thing, the pairing is set by
  ``course/source/jupytext.toml`` and never reaches the learner versions;
- syncing from an edited ``.py`` keeps the cell id of every cell that is still there,
  and every ``grade_id``.

Slow checks (``-m nbgrader``; the autograde runs are shared with tests/test_nbgrader.py
through tests/nbgrade.py): a plain nbgrader course built from the sources gives the
solutions full marks and the untouched learner versions zero, and an answer that wraps
the vtlab helper the exercise asks to do by hand scores nothing on that exercise.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from nbgrade import COURSE_SOURCES, LEARNER_DIR, SOURCE_DIR, WRAPPERS, course, graded_once, is_grade, nbg

#: Every assignment in course/source/ (a new one is checked as soon as its .ipynb exists).
NAMES = sorted(COURSE_SOURCES)
#: The assignments the course must have.
REQUIRED = ["01_rings", "02_vmx_modes", "03_vmcs", "04_exits", "05_memory", "06_events", "07_amd_v"]
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
JUPYTEXT = Path(sys.executable).parent / "jupytext"


def test_every_assignment_has_its_learner_version():
    assert set(REQUIRED) <= set(NAMES), f"course/source/ has {NAMES}"
    assert sorted(p.stem for p in LEARNER_DIR.glob("*.ipynb")) == NAMES, (
        "notebooks/ must hold exactly one learner version per source; run `make notebooks`"
    )


@pytest.mark.parametrize("name", NAMES)
def test_learner_version_has_no_solutions_or_hidden_tests(name):
    raw = (LEARNER_DIR / f"{name}.ipynb").read_text(encoding="utf-8")
    found = [m for m in MARKERS if m in raw]
    assert not found, f"notebooks/{name}.ipynb contains {found}: it must be nbgrader's student version"


@pytest.mark.parametrize("name", NAMES)
def test_source_has_solutions_and_hidden_tests(name):
    for suffix in (".ipynb", ".py"):
        raw = (SOURCE_DIR / name / f"{name}{suffix}").read_text(encoding="utf-8")
        missing = [m for m in MARKERS if m not in raw]
        assert not missing, f"course/source/{name}/{name}{suffix} lacks {missing}"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A fresh ``generate_assignment`` of every source into a course of its own."""
    root = tmp_path_factory.mktemp("learner") / "course"
    cfg = course.load_config(root)
    course.generate(cfg, dict(COURSE_SOURCES))
    return root / "release"


def _cells(nb) -> list[tuple]:
    return [(c.cell_type, c.get("id"), c.source, json.dumps(c.metadata, sort_keys=True)) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_learner_version_is_what_generate_assignment_makes(name, release):
    made = nbformat.read(release / name / f"{name}.ipynb", as_version=4)
    stored = nbformat.read(LEARNER_DIR / f"{name}.ipynb", as_version=4)
    fix = "run `make notebooks` and commit notebooks/ with the sources"
    assert stored.metadata == made.metadata, f"notebooks/{name}.ipynb: notebook metadata differ; {fix}"
    got, want = _cells(stored), _cells(made)
    if got != want:
        diff = next(i for i, (a, b) in enumerate(zip(got + [None] * len(want), want + [None] * len(got))) if a != b)
        pytest.fail(f"notebooks/{name}.ipynb is not what generate_assignment makes from "
                    f"course/source/{name}/{name}.ipynb (first difference at cell {diff}); {fix}",
                    pytrace=False)
    # the learner version keeps the source's cell ids, so links and graders agree
    source = nbformat.read(SOURCE_DIR / name / f"{name}.ipynb", as_version=4)
    assert [c.id for c in stored.cells] == [c.id for c in source.cells]
    assert [nbg(c).get("grade_id") for c in stored.cells] == [nbg(c).get("grade_id") for c in source.cells]


@pytest.mark.parametrize("name", NAMES)
def test_release_ships_only_the_student_notebook(name, release):
    """nbgrader copies every other file of the source folder to the students; the jupytext
    script <a>.py is the instructor version, so tools/nbgrader_course.py ignores it."""
    shipped = sorted(p.name for p in (release / name).iterdir())
    assert shipped == [f"{name}.ipynb"], f"the release of {name} holds {shipped}"


# --------------------------------------------------------------------------- test-cell hygiene


def _bound_names(tree) -> set[str]:
    """Names a cell binds anywhere: assignments, imports, defs, loop and with targets."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            bound |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        elif isinstance(node, ast.Lambda):
            bound |= {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def _top_level_names(tree) -> set[str]:
    """What an answer cell defines for the notebook: its top-level defs and assignments."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("name", NAMES)
def test_test_cells_use_only_their_own_names_and_the_answers(name):
    """Issue #15: a test cell re-imports what it uses and builds its own guests; the only
    notebook globals it reads are the ones the answer cells define (the learner's answer).
    So no answer cell can delete or rebind a global to make a test pass."""
    import builtins

    nb = nbformat.read(SOURCE_DIR / name / f"{name}.ipynb", as_version=4)
    answers = set()
    for cell in nb.cells:
        if nbg(cell).get("solution"):
            answers |= _top_level_names(ast.parse(cell.source))
    problems = {}
    for cell in nb.cells:
        if not is_grade(cell):
            continue
        tree = ast.parse(cell.source)
        loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        free = loaded - _bound_names(tree) - answers - set(dir(builtins))
        if free:
            problems[nbg(cell)["grade_id"]] = sorted(free)
    assert not problems, f"{name}: test cells read notebook globals: {problems}"


@pytest.mark.parametrize("name, test_id, forbidden", [
    ("02_vmx_modes", "ex02_support_tests", "VmxCpu"),
    ("03_vmcs", "ex03_decode_tests", "decode_encoding"),
    ("03_vmcs", "ex03_allowed_tests", "adjust"),
    ("04_exits", "ex04_decode_tests", "IoQualification"),
    ("05_memory", "ex05_decode_tests", "EptViolationQualification"),
    ("06_events", "ex06_decode_tests", "IntrInfo"),
])
def test_by_hand_exercises_refuse_the_vtlab_helper(name, test_id, forbidden):
    """The "by hand" exercises check the answer does not use the vtlab helper that does the
    work, and their hidden tests compare with values written in the test, not that helper."""
    nb = nbformat.read(SOURCE_DIR / name / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if nbg(c).get("grade_id") == test_id)
    visible, _, hidden = cell.source.partition("### BEGIN HIDDEN TESTS")
    assert "names_used(" in visible and f'"{forbidden}"' in visible, "the visible part names the forbidden helper"
    assert "by hand" in visible, "the message says the exercise is done by hand"
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.Call)}
    assert not calls & {"decode_encoding", "adjust", "allowed"}, calls
    assert "IoQualification.decode(" not in hidden


# --------------------------------------------------------------------------- jupytext


def _jupytext():
    return pytest.importorskip("jupytext", reason="jupytext is pinned in requirements.txt")


def _comparable(nb) -> list[tuple]:
    """What the .py of a pair carries: cell type, source and metadata (no ids, no outputs)."""
    return [(c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in nb.cells]


@pytest.mark.parametrize("name", NAMES)
def test_source_pair_is_in_sync(name):
    jupytext = _jupytext()
    ipynb = nbformat.read(SOURCE_DIR / name / f"{name}.ipynb", as_version=4)
    py = jupytext.read(SOURCE_DIR / name / f"{name}.py")
    got, want = _comparable(py), _comparable(ipynb)
    if got != want:
        diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        pytest.fail(f"course/source/{name}: {name}.py and {name}.ipynb differ from cell {diff} on; "
                    f"run `jupytext --sync course/source/{name}/{name}.ipynb` (or `make notebooks`)",
                    pytrace=False)
    assert "jupytext" not in ipynb.metadata, (
        f"{name}.ipynb carries jupytext metadata; nbgrader would copy the pairing into the "
        f"learner version (the pairing belongs in course/source/jupytext.toml)"
    )


def test_pairing_is_configured_for_the_sources_only():
    jupytext = _jupytext()
    from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file

    found = find_jupytext_configuration_file(str(SOURCE_DIR / "01_rings"))
    assert found and Path(found).resolve() == (SOURCE_DIR / "jupytext.toml").resolve(), found
    config = load_jupytext_configuration_file(found)
    assert list(config.formats) == ["ipynb,py:percent"], config.formats
    # the learner versions are not paired: no config applies to notebooks/
    assert find_jupytext_configuration_file(str(LEARNER_DIR)) is None
    for name in NAMES:
        assert "jupytext" not in nbformat.read(LEARNER_DIR / f"{name}.ipynb", as_version=4).metadata
    assert jupytext.__version__ == "1.19.6"


def test_sync_from_an_edited_script_keeps_cell_ids_and_grade_ids(tmp_path):
    """An instructor edits 04_exits.py (changes a markdown cell, adds a cell, deletes a
    code cell), runs `jupytext --sync`: every remaining cell keeps its id, every grade_id
    stays, the edit is in the .ipynb."""
    _jupytext()
    name = "04_exits"
    work = tmp_path / "source"
    (work / name).mkdir(parents=True)
    shutil.copy2(SOURCE_DIR / "jupytext.toml", work / "jupytext.toml")
    for suffix in (".ipynb", ".py"):
        shutil.copy2(SOURCE_DIR / name / f"{name}{suffix}", work / name / f"{name}{suffix}")
    before = nbformat.read(work / name / f"{name}.ipynb", as_version=4)

    py = work / name / f"{name}.py"
    text = py.read_text(encoding="utf-8")
    cells = text.split("\n# %%")
    # the first markdown cell after the title: change a line of its text
    edited = next(i for i, c in enumerate(cells) if i > 1 and c.startswith(" [markdown]"))
    cells[edited] = cells[edited].rstrip("\n") + "\n#\n# (An instructor's note, added in the .py.)\n\n"
    # a new code cell before it, and one ungraded code cell deleted
    cells.insert(edited, "\ninstructor_added = 1\n\n")
    deleted = next(i for i, c in enumerate(cells) if i > edited + 1 and c.startswith("\n") and "nbgrader" not in c.split("\n")[0])
    deleted_source = cells.pop(deleted).strip("\n")
    py.write_text("\n# %%".join(cells), encoding="utf-8")
    # the .py must be the newer file of the pair, as after an edit
    ipynb = work / name / f"{name}.ipynb"
    stamp = ipynb.stat().st_mtime
    import os

    os.utime(py, (stamp + 10, stamp + 10))

    proc = subprocess.run([str(JUPYTEXT), "--sync", str(ipynb)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = nbformat.read(ipynb, as_version=4)

    assert len(after.cells) == len(before.cells), "one cell added, one deleted"
    old_ids = {c.source: c.id for c in before.cells}
    kept = [c for c in after.cells if c.source in old_ids]
    assert len(kept) == len(before.cells) - 2, "all but the edited and the deleted cell are unchanged"
    assert all(c.id == old_ids[c.source] for c in kept), [
        (c.id, old_ids[c.source]) for c in kept if c.id != old_ids[c.source]
    ]
    assert not any(c.source == deleted_source for c in after.cells)
    note = next(c for c in after.cells if "(An instructor's note, added in the .py.)" in c.source)
    assert note.id == before.cells[edited - 1].id, "the edited cell keeps its id"
    added = next(c for c in after.cells if c.source == "instructor_added = 1")
    assert added.id not in {c.id for c in before.cells}
    grade_ids = lambda nb: [nbg(c)["grade_id"] for c in nb.cells if nbg(c)]  # noqa: E731
    assert grade_ids(after) == grade_ids(before)
    # ...and nbgrader still makes a student version of it
    cfg = course.load_config(tmp_path / "course")
    release = course.generate(cfg, {name: ipynb})[name]
    assert "BEGIN SOLUTION" not in release.read_text(encoding="utf-8")


def test_saving_in_jupyterlab_writes_both_files_of_the_pair(tmp_path):
    """What the jupytext server extension does in JupyterLab (`make lab`): saving a source
    notebook writes its .py too, keeps the cell ids and adds no pairing metadata; saving a
    learner version writes no .py beside it."""
    _jupytext()
    import asyncio

    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class

    name = "02_vmx_modes"
    (tmp_path / "course" / "source").mkdir(parents=True)
    shutil.copy2(SOURCE_DIR / "jupytext.toml", tmp_path / "course" / "source" / "jupytext.toml")
    shutil.copytree(SOURCE_DIR / name, tmp_path / "course" / "source" / name)
    (tmp_path / "notebooks").mkdir()
    shutil.copy2(LEARNER_DIR / f"{name}.ipynb", tmp_path / "notebooks" / f"{name}.ipynb")
    manager = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(root_dir=str(tmp_path))
    source = f"course/source/{name}/{name}.ipynb"

    async def edit_and_save():
        model = await manager.get(source)
        nb = model["content"]
        ids = [c["id"] for c in nb["cells"]]
        markdown = next(c for c in nb["cells"][1:] if c["cell_type"] == "markdown")
        markdown["source"] += "\n\nEdited in JupyterLab."
        await manager.save({"type": "notebook", "content": nb}, source)
        learner = await manager.get(f"notebooks/{name}.ipynb")
        await manager.save({"type": "notebook", "content": learner["content"]}, f"notebooks/{name}.ipynb")
        return ids

    ids = asyncio.run(edit_and_save())
    saved = nbformat.read(tmp_path / source, as_version=4)
    assert [c.id for c in saved.cells] == ids
    assert "jupytext" not in saved.metadata
    assert "Edited in JupyterLab." in (tmp_path / "course" / "source" / name / f"{name}.py").read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "notebooks").iterdir() if not p.name.startswith(".")) == [f"{name}.ipynb"]


# --------------------------------------------------------------------------- grading (slow)


@pytest.fixture(scope="module", params=NAMES)
def graded(request, tmp_path_factory):
    return graded_once(COURSE_SOURCES[request.param], tmp_path_factory)


@pytest.mark.nbgrader
def test_solutions_full_marks_learner_versions_zero(graded):
    """A vanilla nbgrader course from course/source/: the solutions pasted into the student
    version score every point; the committed learner version, untouched, scores none."""
    assert not graded.failures, "\n".join(graded.failures)
    assert graded.blank_from == LEARNER_DIR / f"{graded.name}.ipynb"
    full, max_full = graded.score("full")
    blank, max_blank = graded.score("blank")
    assert full == max_full == graded.max_points > 0, (graded.name, graded.cells["full"])
    assert blank == 0 and max_blank == graded.max_points, (graded.name, graded.cells["blank"])


@pytest.mark.nbgrader
@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_wrapping_the_vtlab_helper_scores_nothing(name, tmp_path_factory):
    """The exercise asks to decode by hand; an answer that calls the vtlab helper (here
    IoQualification.decode) gets 0 on that test cell, and every other cell full marks."""
    g = graded_once(COURSE_SOURCES[name], tmp_path_factory)
    assert not g.failures, "\n".join(g.failures)
    _answer_id, test_id, _source = WRAPPERS[name]
    cells = g.cells["wrapper"]
    assert cells[test_id][0] == 0, f"{name}: the wrapper scored {cells[test_id]} on {test_id}"
    others = {k: v for k, v in cells.items() if k != test_id and v[0] != v[1]}
    assert not others, f"{name}: the wrapper lost points elsewhere: {others}"
    test_cell = next(c for c in g.autograded("wrapper").cells if nbg(c).get("grade_id") == test_id)
    assert is_grade(test_cell)
    errors = [o for o in test_cell.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and "by hand" in errors[0].get("evalue", ""), (
        f"{name}: the message should say the exercise is done by hand: {errors}"
    )


OBFUSCATED_WRAPPER = '''\
import importlib


def decode_io(qualification: int) -> dict:
    helper = getattr(importlib.import_module("vtlab.arch." + "qualifications"), "IoQual" + "ification")
    r = getattr(helper, "de" + "code")(qualification)
    return {"port": r.port, "size": r.size, "direction": r.direction.name, "string": r.string,
            "rep": r.rep, "immediate": r.immediate}
'''


@pytest.mark.nbgrader
def test_decode_test_cell_catches_a_hidden_call_to_the_helper(tmp_path):
    """A wrapper that hides its call to IoQualification.decode from the name check
    (getattr on built strings) still fails 04's decode test cell: the test switches the
    helper off while the answer runs. The instructor's solution passes the same cell."""
    from nbclient import NotebookClient

    from nbrun import KERNEL_NAME, _kernel_env, check_kernel

    source = nbformat.read(SOURCE_DIR / "04_exits" / "04_exits.ipynb", as_version=4)
    by_id = {nbg(c).get("grade_id"): c for c in source.cells}
    check_kernel()
    results = {}
    for label, answer in (("solution", by_id["ex04_decode"].source), ("obfuscated", OBFUSCATED_WRAPPER)):
        nb = nbformat.v4.new_notebook(metadata=source.metadata)
        for src in (by_id["nb04_setup"].source, answer, by_id["ex04_decode_tests"].source):
            nb.cells.append(nbformat.v4.new_code_cell(src))
        NotebookClient(nb, timeout=120, kernel_name=KERNEL_NAME, allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path)}}).execute(env=_kernel_env())
        results[label] = [o for o in nb.cells[-1].outputs if o.get("output_type") == "error"]
    assert results["solution"] == [], results["solution"]
    errors = results["obfuscated"]
    assert errors and errors[0]["ename"] == "AssertionError", errors
    assert "by hand" in errors[0]["evalue"] and "IoQualification.decode" in errors[0]["evalue"], errors[0]["evalue"]
