"""nbgrader configuration for the vtlab course (nbgrader 0.9).

The instructor sources live in nbgrader's own layout under ``course/`` (committed), one
assignment per notebook, each paired by jupytext with a percent-format script;
``tools/nbgrader_course.py`` (``make notebooks`` / ``make assignments`` / ``make autograde``)
runs the steps::

    course/source/01_rings/01_rings.ipynb        instructor version (solutions, hidden tests)
    course/source/01_rings/01_rings.py           the same notebook as a jupytext script
    course/release/01_rings/01_rings.ipynb       learner version (copied to notebooks/)
    course/submitted/<student>/01_rings/...      collected submissions
    course/autograded/<student>/01_rings/...     executed and scored submissions
    course/gradebook.db                          the gradebook (SQLite)
    course/grades.csv                            exported grades

nbgrader reads this file from the working directory, so the plain ``nbgrader`` command
and the formgrader also work when started from the repository root.
"""

import os

c = get_config()  # noqa: F821  (provided by traitlets when it loads this file)

_REPO = os.path.dirname(os.path.abspath(globals().get("__file__") or os.path.join(os.getcwd(), "x")))

c.CourseDirectory.course_id = "vtlab"
c.CourseDirectory.root = os.path.join(_REPO, "course")
# The gradebook defaults to sqlite:///<root>/gradebook.db, i.e. course/gradebook.db.

# A cell that runs longer than this (seconds) is interrupted and recorded as failed, so a
# student's endless loop cannot hang the autograder; the rest of the notebook still runs.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# What replaces `### BEGIN SOLUTION ... ### END SOLUTION` in the student version.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Files of an assignment's source folder that never go into its release: the paired
# jupytext script holds every solution and hidden test, so a plain
# `nbgrader generate_assignment` must not copy it (tools/nbgrader_course.py applies the
# same list, RELEASE_IGNORE).
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "*.py", "jupytext.toml", ".jupytext*"]
