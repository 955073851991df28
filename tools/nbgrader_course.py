#!/usr/bin/env python3
"""Run the nbgrader steps of the vtlab course (nbgrader 0.9).

The instructor sources live in nbgrader's own layout, committed to the repository, one
assignment per notebook, each paired by jupytext with a percent-format script::

    course/source/01_rings/01_rings.ipynb   instructor version (solutions, hidden tests)
    course/source/01_rings/01_rings.py      the same notebook as text (jupytext pairing)
    notebooks/01_rings.ipynb                learner version = course/release/01_rings/...

``notebooks/`` holds the learner versions, exactly what ``nbgrader generate_assignment``
makes from the sources; ``make notebooks`` (``generate`` + ``learner``) rewrites them.
A folder of flat notebooks (``--source DIR`` with ``DIR/<name>.ipynb``) works too: each
notebook with nbgrader metadata becomes an assignment named after its stem.

Commands (run with the project's venv; ``make notebooks`` / ``make assignments`` /
``make autograde`` wrap them)::

    python tools/nbgrader_course.py generate [ASSIGNMENT ...]
        generate the student versions from the sources into course/release/<assignment>/
        (solutions stripped, hidden tests removed, outputs cleared); sources outside the
        course root are first copied to <course>/source/
    python tools/nbgrader_course.py learner [ASSIGNMENT ...]
        copy course/release/<a>/<a>.ipynb to notebooks/<a>.ipynb (the learner versions
        that `make lab`, Binder and the hub open); run `generate` first
    python tools/nbgrader_course.py autograde SUBMISSIONS [ASSIGNMENT ...]
        copy SUBMISSIONS/<student>/<assignment>/<assignment>.ipynb into
        course/submitted/, autograde them (always re-grading: --force) and export all
        grades to course/grades.csv
    python tools/nbgrader_course.py validate [ASSIGNMENT ...]
        check that every instructor notebook's solutions pass its tests
        (unlike `nbgrader validate`, exits 1 when they do not)
    python tools/nbgrader_course.py export
        write course/grades.csv from the gradebook

Options (before the command): ``--course DIR`` (default ``course/``), ``--source DIR``
(instructor sources, default ``course/source/``; ``--notebooks`` is an old name for it),
``--learner DIR`` (default ``notebooks/``), ``--timeout SECONDS`` per cell, ``--csv FILE``, ``-v``.
Settings come from ``nbgrader_config.py`` at the repository root; the options override it.
Exit status: 0 on success, 1 when a step failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "nbgrader_config.py"
DEFAULT_COURSE = REPO / "course"
#: The committed instructor sources, in nbgrader's layout: source/<a>/<a>.ipynb.
DEFAULT_SOURCE = DEFAULT_COURSE / "source"
#: The learner versions: what `make lab`, Binder and the hub open.
DEFAULT_LEARNER = REPO / "notebooks"
#: Old name of DEFAULT_LEARNER, kept for scripts that imported it.
DEFAULT_NOTEBOOKS = DEFAULT_LEARNER

#: Never copied from a source assignment folder into the release (nbgrader copies every
#: other file it finds there to the students): ``<a>.py`` is the jupytext twin of the
#: instructor notebook, solutions and hidden tests included. The course ships its Python
#: code in the vtlab package, so no assignment needs a .py file of its own.
RELEASE_IGNORE = ("*.py", "jupytext.toml", ".jupytext*")

# Files next to the notebooks that are not notebooks are copied into every assignment
# (images, data); these are never copied.
IGNORED_NAMES = {".ipynb_checkpoints", "__pycache__", ".DS_Store"}

# nbgrader's gradebook runs the `alembic` command found on PATH; make it the one next to
# this interpreter, so the script works without activating the venv.
_BIN = str(Path(sys.executable).parent)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

# nbgrader 0.9's gradebook trips SQLAlchemy "not in session" warnings on every autograde;
# they are harmless noise for the instructor.
warnings.filterwarnings("ignore", message=r".*not in session.*")

LOG = logging.getLogger("vtlab.course")
NBGRADER_LOG = logging.getLogger("vtlab.course.nbgrader")


class CourseError(Exception):
    """A step failed; the message says which and why."""


# --------------------------------------------------------------------------- discovery


def has_nbgrader_metadata(path: Path) -> bool:
    """True if any cell of the notebook at *path* carries ``metadata.nbgrader``."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    return any("nbgrader" in cell.get("metadata", {}) for cell in nb.get("cells", []))


def find_assignments(notebooks_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Map assignment name -> instructor notebook, for notebooks with nbgrader metadata.

    *notebooks_dir* is either an nbgrader source folder (``<a>/<a>.ipynb``, as
    ``course/source/``) or a flat folder of notebooks (``<a>.ipynb``); both kinds are
    found. With *names*, only those (each must be an nbgrader notebook there).
    """
    notebooks_dir = Path(notebooks_dir)
    candidates = sorted(notebooks_dir.glob("*/*.ipynb")) + sorted(notebooks_dir.glob("*.ipynb"))
    found = {}
    for p in candidates:
        if p.name.startswith(".") or p.parent.name in IGNORED_NAMES:
            continue
        # in the nbgrader layout only <a>/<a>.ipynb is the assignment's notebook
        if p.parent != notebooks_dir and p.parent.name != p.stem:
            continue
        if p.stem not in found and has_nbgrader_metadata(p):
            found[p.stem] = p
    if not names:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise CourseError(
            f"no nbgrader notebook for {', '.join(missing)} in {notebooks_dir} "
            f"(found: {', '.join(found) or 'none'})"
        )
    return {n: found[n] for n in names}


# --------------------------------------------------------------------------- configuration


def load_config(course: Path | None = None, timeout: int | None = None):
    """The traitlets Config from nbgrader_config.py, with the course root and timeout overridden."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    cfg = Config()
    if CONFIG_FILE.exists():
        cfg.merge(PyFileConfigLoader(CONFIG_FILE.name, path=str(CONFIG_FILE.parent)).load_config())
    if course is not None:
        cfg.CourseDirectory.root = str(Path(course).resolve())
    elif "root" not in cfg.CourseDirectory:
        cfg.CourseDirectory.root = str(DEFAULT_COURSE)
    if timeout is not None:
        cfg.Execute.timeout = int(timeout)
    from nbgrader.coursedir import CourseDirectory

    # extend, not replace, nbgrader's own list (or the one nbgrader_config.py sets)
    ignore = list(cfg.CourseDirectory.ignore) if "ignore" in cfg.CourseDirectory else list(
        CourseDirectory.class_traits()["ignore"].default()
    )
    cfg.CourseDirectory.ignore = ignore + [p for p in RELEASE_IGNORE if p not in ignore]
    return cfg


@functools.lru_cache(maxsize=None)
def _patch_nbgrader() -> None:
    """Make creating a gradebook fast.

    nbgrader 0.9 learns the schema revision to stamp into a new gradebook by running
    ``alembic heads`` in a subprocess, which re-imports nbgrader and takes 5-10 s every
    time. Read the same revision from nbgrader's alembic scripts in-process instead (once
    per process); fall back to nbgrader's own way if that fails.
    """
    import nbgrader.api as api

    original = api.get_alembic_version

    @functools.lru_cache(maxsize=None)
    def get_alembic_version() -> str:
        try:
            from alembic.config import Config as AlembicConfig
            from alembic.script import ScriptDirectory

            acfg = AlembicConfig()
            acfg.set_main_option("script_location", str(Path(api.__file__).parent / "alembic"))
            head = ScriptDirectory.from_config(acfg).get_current_head()
            if head:
                return head
        except Exception:  # pragma: no cover - depends on alembic internals
            pass
        return original()

    api.get_alembic_version = get_alembic_version


def _coursedir(cfg, assignment_id: str = "*", student_id: str = "*"):
    from nbgrader.coursedir import CourseDirectory

    _patch_nbgrader()

    cd = CourseDirectory(config=cfg, log=NBGRADER_LOG)
    cd.assignment_id = assignment_id
    cd.student_id = student_id
    return cd


def course_root(cfg) -> Path:
    return Path(_coursedir(cfg).root)


# --------------------------------------------------------------------------- steps


def layout(cfg, assignments: dict[str, Path]) -> dict[str, Path]:
    """Make sure each instructor notebook is at ``<course>/source/<a>/<a>.ipynb``.

    A notebook already there (the committed sources under the default course root) is
    used in place; any other is copied there, with the files beside it (images, data).
    Returns assignment -> path of the source notebook.
    """
    root = course_root(cfg)
    out = {}
    for name, nb_path in assignments.items():
        dest_dir = root / "source" / name
        if Path(nb_path).resolve() == (dest_dir / f"{name}.ipynb").resolve():
            out[name] = dest_dir / f"{name}.ipynb"
            continue
        dest_dir.mkdir(parents=True, exist_ok=True)
        for extra in sorted(nb_path.parent.iterdir()):
            if extra.suffix == ".ipynb" or extra.name in IGNORED_NAMES or extra.name.startswith("."):
                continue
            target = dest_dir / extra.name
            if extra.is_dir():
                shutil.copytree(extra, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*IGNORED_NAMES))
            else:
                shutil.copy2(extra, target)
        shutil.copy2(nb_path, dest_dir / f"{name}.ipynb")
        out[name] = dest_dir / f"{name}.ipynb"
        LOG.info("source   %s -> %s", nb_path, _rel(out[name]))
    return out


def generate(cfg, assignments: dict[str, Path]) -> dict[str, Path]:
    """Lay out and generate the student versions; returns assignment -> release notebook."""
    from nbgrader.converters import GenerateAssignment
    from nbgrader.converters.base import NbGraderException

    layout(cfg, assignments)
    root = course_root(cfg)
    out = {}
    for name in assignments:
        conv = GenerateAssignment(coursedir=_coursedir(cfg, name), config=cfg, log=NBGRADER_LOG)
        conv.force = True
        conv.create_assignment = True
        try:
            conv.start()
        except NbGraderException as exc:
            raise CourseError(f"generate_assignment {name} failed: {exc}") from None
        out[name] = root / "release" / name / f"{name}.ipynb"
        if not out[name].exists():
            raise CourseError(f"generate_assignment {name} produced no {out[name]}")
        LOG.info("release  %s", _rel(out[name]))
    return out


def learner(cfg, names: list[str], dest_dir: Path) -> dict[str, Path]:
    """Copy ``<course>/release/<a>/<a>.ipynb`` to ``dest_dir/<a>.ipynb`` for each name.

    The copies are byte for byte what ``nbgrader generate_assignment`` wrote, so the
    learner versions in ``notebooks/`` are exactly the release (tests/test_learner_versions.py
    checks it). Returns assignment -> learner notebook.
    """
    root = course_root(cfg)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        release = root / "release" / name / f"{name}.ipynb"
        if not release.exists():
            raise CourseError(f"no student version {release}; run the generate command first")
        out[name] = dest_dir / f"{name}.ipynb"
        shutil.copyfile(release, out[name])
        LOG.info("learner  %s -> %s", _rel(release), _rel(out[name]))
    return out


def gradebook_assignments(cfg) -> set[str]:
    from nbgrader.api import Gradebook

    cd = _coursedir(cfg)
    if not (Path(cd.root) / "gradebook.db").exists() and cd.db_url.startswith("sqlite"):
        return set()
    with Gradebook(cd.db_url, cd.course_id) as gb:
        return {a.name for a in gb.assignments}


def collect(cfg, submissions: Path, names: list[str] | None = None) -> list[tuple[str, str]]:
    """Copy ``<submissions>/<student>/<assignment>/`` into ``course/submitted/``.

    Returns the (student, assignment) pairs found, restricted to *names* if given.
    """
    submissions = Path(submissions).resolve()
    if not submissions.is_dir():
        raise CourseError(f"submissions folder {submissions} does not exist")
    dest_root = course_root(cfg) / "submitted"
    same = dest_root.exists() and dest_root.resolve() == submissions
    pairs = []
    for student_dir in sorted(p for p in submissions.iterdir() if p.is_dir()):
        if student_dir.name.startswith(".") or student_dir.name in IGNORED_NAMES:
            continue
        for a_dir in sorted(p for p in student_dir.iterdir() if p.is_dir()):
            if a_dir.name.startswith(".") or a_dir.name in IGNORED_NAMES:
                continue
            if names and a_dir.name not in names:
                continue
            if not any(a_dir.glob("*.ipynb")):
                LOG.warning("skip     %s: no notebook in it", a_dir)
                continue
            if not same:
                target = dest_root / student_dir.name / a_dir.name
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(a_dir, target, ignore=shutil.ignore_patterns(*IGNORED_NAMES))
            pairs.append((student_dir.name, a_dir.name))
    if not pairs:
        raise CourseError(
            f"no submissions found in {submissions}; expected "
            f"<student>/<assignment>/<assignment>.ipynb below it"
        )
    return pairs


def autograde(cfg, pairs: list[tuple[str, str]], notebooks_dir: Path) -> list[str]:
    """Autograde each (student, assignment) with --force; returns failure messages."""
    from nbgrader.converters import Autograde
    from nbgrader.converters.base import NbGraderException

    known = gradebook_assignments(cfg)
    needed = sorted({a for _, a in pairs} - known)
    failures = []
    if needed:
        available = find_assignments(notebooks_dir)
        missing = [a for a in needed if a not in available]
        for a in missing:
            failures.append(f"{a}: not an assignment (no nbgrader notebook {a}.ipynb in {notebooks_dir})")
        todo = {a: available[a] for a in needed if a in available}
        if todo:
            LOG.info("the gradebook lacks %s; generating it first", ", ".join(todo))
            generate(cfg, todo)
        pairs = [(s, a) for s, a in pairs if a not in missing]
    for student, name in pairs:
        conv = Autograde(coursedir=_coursedir(cfg, name, student), config=cfg, log=NBGRADER_LOG)
        conv.force = True
        conv.create_student = True
        try:
            conv.start()
        except NbGraderException as exc:
            failures.append(f"{student}/{name}: autograde failed: {exc}")
            LOG.error("FAILED   %s/%s: %s", student, name, exc)
        else:
            LOG.info("graded   %s/%s", student, name)
    return failures


def export_csv(cfg, dest: Path) -> Path:
    """Export every grade in the gradebook to the CSV file *dest*."""
    from nbgrader.api import Gradebook
    from nbgrader.plugins import CsvExportPlugin

    cd = _coursedir(cfg)
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Gradebook(cd.db_url, cd.course_id) as gb:
        plugin = CsvExportPlugin(config=cfg, log=NBGRADER_LOG)
        plugin.to = str(dest)
        plugin.export(gb)
    LOG.info("grades   %s", _rel(dest))
    return dest


def validate(cfg, assignments: dict[str, Path]) -> dict[str, dict]:
    """Run nbgrader's Validator on each instructor notebook; returns name -> problems ({} = ok)."""
    from nbgrader.validator import Validator

    results = {}
    for name, path in assignments.items():
        validator = Validator(config=cfg, log=NBGRADER_LOG)
        results[name] = validator.validate(str(path))
        LOG.info("validate %s: %s", name, "ok" if not results[name] else "FAILED")
    return results


def format_validation(name: str, problems: dict) -> str:
    lines = [f"{name}: validation failed"]
    for kind, cells in problems.items():
        for cell in cells:
            lines.append(f"--- {kind} cell ---")
            lines.append(cell.get("source", ""))
            if cell.get("raw_error"):
                lines.append("--- error ---")
                lines.append(cell["raw_error"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nbgrader_course.py",
        description="Lay the vtlab course out for nbgrader and run the nbgrader steps.",
    )
    parser.add_argument("--course", type=Path, default=None, help="course root (default: course/ via nbgrader_config.py)")
    parser.add_argument(
        "--source", "--notebooks", dest="source", type=Path, default=DEFAULT_SOURCE,
        help="instructor notebooks: <a>/<a>.ipynb or flat <a>.ipynb (default: course/source/)",
    )
    parser.add_argument("--learner", type=Path, default=DEFAULT_LEARNER, help="where `learner` writes (default: notebooks/)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell before it is interrupted")
    parser.add_argument("--csv", type=Path, default=None, help="grades CSV (default: <course>/grades.csv)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show nbgrader's own log")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd, text in [
        ("layout", "copy notebooks into <course>/source/<a>/<a>.ipynb"),
        ("generate", "generate student versions into <course>/release/"),
        ("learner", "copy <course>/release/<a>/<a>.ipynb to the learner folder (notebooks/)"),
        ("validate", "check every instructor notebook's solutions pass its tests"),
    ]:
        p = sub.add_parser(cmd, help=text)
        p.add_argument("assignments", nargs="*", help="assignment names (default: all)")
    p = sub.add_parser("autograde", help="autograde a folder of submissions and export grades")
    p.add_argument("submissions", type=Path, help="folder laid out as <student>/<assignment>/<assignment>.ipynb")
    p.add_argument("assignments", nargs="*", help="only these assignments (default: all found)")
    sub.add_parser("export", help="export the gradebook to CSV")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    NBGRADER_LOG.setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        # Test cells with hidden tests never match the checksum of the instructor version,
        # so nbgrader warns about every one of them; it grades with the instructor's test
        # cells anyway (a student cannot change them), so the warning is only noise.
        NBGRADER_LOG.addFilter(lambda record: "Attribute 'checksum' for cell" not in record.getMessage())

    cfg = load_config(args.course, args.timeout)
    csv_path = args.csv or course_root(cfg) / "grades.csv"
    try:
        if args.command in ("layout", "generate", "validate", "learner"):
            assignments = find_assignments(args.source, args.assignments)
            if not assignments:
                raise CourseError(f"no notebooks with nbgrader metadata in {args.source}")
            if args.command == "learner":
                written = learner(cfg, list(assignments), args.learner)
                print(f"learner versions: {_rel(args.learner)}/ ({', '.join(written)})")
            elif args.command == "layout":
                layout(cfg, assignments)
            elif args.command == "generate":
                release = generate(cfg, assignments)
                print(f"student versions: {_rel(course_root(cfg) / 'release')}/ ({', '.join(release)})")
            else:
                results = validate(cfg, assignments)
                bad = {n: r for n, r in results.items() if r}
                for name, problems in bad.items():
                    print(format_validation(name, problems), file=sys.stderr)
                print(f"validated {len(results)} notebook(s): {len(bad)} failed")
                return 1 if bad else 0
        elif args.command == "autograde":
            pairs = collect(cfg, args.submissions, args.assignments)
            failures = autograde(cfg, pairs, args.source)
            export_csv(cfg, csv_path)
            print(f"autograded {len(pairs)} submission(s); grades: {_rel(csv_path)}")
            for f in failures:
                print(f"FAILED: {f}", file=sys.stderr)
            return 1 if failures else 0
        elif args.command == "export":
            export_csv(cfg, csv_path)
            print(f"grades: {_rel(csv_path)}")
    except CourseError as exc:
        print(f"nbgrader_course: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
