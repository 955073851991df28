"""nbgrader_config.py keeps the paired jupytext scripts (which hold the solutions) out of
every release, also when an instructor runs plain `nbgrader generate_assignment`."""
from __future__ import annotations

import sys
from pathlib import Path

from traitlets.config.loader import PyFileConfigLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import nbgrader_course  # noqa: E402


def test_plain_nbgrader_ignores_what_the_course_tool_ignores():
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(REPO)).load_config()
    ignore = list(cfg.CourseDirectory.ignore)
    for pattern in nbgrader_course.RELEASE_IGNORE:
        assert pattern in ignore, pattern
    # nbgrader's own defaults stay ignored too
    for pattern in (".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback"):
        assert pattern in ignore, pattern
