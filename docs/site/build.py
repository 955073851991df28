#!/usr/bin/env python3
"""Build the vtlab course site (MyST, the engine of Jupyter Book 2) from the learner notebooks.

``make site`` runs it. Every step writes into the build folder (``build/site/`` by
default), never into the tree:

1. copy ``notebooks/NN_*.ipynb`` (the learner versions) with docs/site/myst.yml and
   index.md into ``<out>/src/``;
2. execute each copy there with nbclient, so the pages show real outputs; the exercise
   cells are blank (``raise NotImplementedError()``), so the outputs of nbgrader's answer
   and test cells are tagged ``remove-output`` instead of showing tracebacks;
3. ``myst build --site`` (page content, always offline) and, unless ``--content-only``,
   ``myst build --html`` (the static site in ``<out>/src/_build/html/``).

mystmd fetches its HTML theme (book-theme) from api.mystmd.org on its first ``--html``
build. Where that host cannot be reached, set ``SITE_TEMPLATE`` (or ``--template``) to a
theme folder fetched elsewhere with ``myst templates download site book-theme``; without
one the script says so and exits 3 after the content build.

Exit status: 0 built, 1 a notebook or mystmd failed, 3 the HTML theme is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent
#: Tags that MyST reads from cell metadata: hide the cell's output on the page.
REMOVE_OUTPUT = "remove-output"


def myst_command() -> list[str]:
    """The myst CLI of this interpreter's environment (requirements-site.txt)."""
    exe = Path(sys.executable).parent / "myst"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "mystmd_py.main"]


def prepare(out: Path, template: str | None) -> list[Path]:
    """Copy the learner notebooks and the site's files into *out*/src; returns the notebooks."""
    src = out / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    notebooks = []
    for nb in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        shutil.copy2(nb, src / nb.name)
        notebooks.append(src / nb.name)
    shutil.copy2(SITE / "index.md", src / "index.md")
    config = (SITE / "myst.yml").read_text(encoding="utf-8")
    if template:
        config = re.sub(r"^(\s*template:).*$", rf"\1 {Path(template).resolve()}", config, count=1, flags=re.M)
    (src / "myst.yml").write_text(config, encoding="utf-8")
    return notebooks


def execute(path: Path, timeout: int) -> int:
    """Run the notebook at *path* in place (in the build folder); returns its error count
    outside the exercise cells."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = 0
    for cell in nb.cells:
        grading = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type != "code":
            continue
        if grading.get("solution") or grading.get("grade"):
            tags = cell.metadata.setdefault("tags", [])
            if REMOVE_OUTPUT not in tags:
                tags.append(REMOVE_OUTPUT)
        elif any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            errors += 1
    nbformat.write(nb, path)
    return errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build" / "site", help="build folder (default build/site)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--no-execute", dest="run", action="store_false", help="keep the notebooks as they are")
    ap.add_argument("--content-only", action="store_true", help="only `myst build --site` (no theme needed)")
    ap.add_argument("--template", default=os.environ.get("SITE_TEMPLATE") or None,
                    help="a book-theme folder to use instead of downloading it ($SITE_TEMPLATE)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    if out == REPO or REPO in out.parents and not str(out.relative_to(REPO)).startswith("build"):
        print(f"site: build into build/ or outside the repository, not {out}", file=sys.stderr)
        return 2
    notebooks = prepare(out, args.template)
    if args.run:
        for nb in notebooks:
            errors = execute(nb, args.timeout)
            print(f"site: executed {nb.name}" + (f" ({errors} cells with errors outside the exercises)" if errors else ""))
            if errors:
                return 1
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    src = out / "src"
    r = subprocess.run(myst_command() + ["build", "--site"], cwd=src, env=env, capture_output=True, text=True)
    content = src / "_build" / "site" / "content"
    pages = sorted(p.name for p in content.glob("*.json")) if content.is_dir() else []
    print(f"site: content of {len(pages)} pages in {content}")
    if len(pages) < len(notebooks) + 1:
        print(r.stdout[-3000:] + r.stderr[-3000:], file=sys.stderr)
        return 1
    if args.content_only:
        return 0
    r = subprocess.run(myst_command() + ["build", "--html"], cwd=src, env=env, capture_output=True, text=True)
    html = src / "_build" / "html" / "index.html"
    if r.returncode != 0 or not html.is_file():
        log = r.stdout + r.stderr
        if "api.mystmd.org" in log and "failed" in log:
            print("site: mystmd could not download its HTML theme (book-theme) from api.mystmd.org. "
                  "On a machine that can, run `myst templates download site book-theme DIR`, then "
                  "`make site SITE_TEMPLATE=DIR` here.", file=sys.stderr)
            return 3
        print(log[-4000:], file=sys.stderr)
        return 1
    print(f"site: {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
