# vtlab — one way to set up, one way to test.
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv (and Debian's chromium) and run the whole test suite (CI)
#   make check  the fast subset for the inner loop (no notebooks, nbgrader, fuzz,
#               browser or Binder venv; about a minute)
#   make bench  run the benchmarks
#   make wheels check that every runtime dependency has a wheel on the five platforms
#   make notebooks  rewrite the learner versions notebooks/*.ipynb from the instructor
#               sources course/source/ (docs/NOTEBOOKS.md)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Extra arguments for `jupyter lab`, e.g. JUPYTER_ARGS="--no-browser --port 8899".
JUPYTER_ARGS ?=
# JupyterLab refuses to start as root without --allow-root.
ROOT_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root,)

CHROMIUM := /usr/bin/chromium

.PHONY: venv lab browser test check bench wheels clean distclean

venv: $(STAMP)

# The site builder (requirements-site.txt) is installed for `make test` too, so that the
# test that builds the course site runs in CI instead of skipping.
SITE_STAMP := $(VENV)/.site-installed
$(SITE_STAMP): requirements-site.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-site.txt
	@touch $@

# Re-runs whenever the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e .
	@touch $@

lab: venv
	$(VENV)/bin/jupyter lab $(ROOT_ARGS) $(JUPYTER_ARGS) notebooks/01_rings.ipynb

# The browser test drives Debian's chromium through Playwright (never `playwright install`).
browser:
	@if [ -x $(CHROMIUM) ]; then \
	  echo "browser: $$($(CHROMIUM) --version 2>/dev/null || echo $(CHROMIUM))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: $(CHROMIUM) missing; installing Debian's chromium"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update && apt-get install -y chromium \
	    || { echo "browser: apt-get could not install chromium; the browser test needs $(CHROMIUM)" >&2; exit 1; }; \
	else \
	  echo "browser: WARNING: $(CHROMIUM) is missing and cannot be installed without root." >&2; \
	  echo "browser: install it with:  sudo apt-get update && sudo apt-get install -y chromium" >&2; \
	  echo "browser: the browser test cannot run until then." >&2; \
	fi

# The browser test gets a pytest process of its own: Playwright's greenlet-driven client
# and Unicorn's C-to-Python hook callbacks are kept out of one interpreter (a run with
# both once died in Unicorn right after the browser test).
test: venv browser $(SITE_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/test_browser.py
	$(PY) -m pytest -q -p no:cacheprovider tests/test_browser.py

# The tests tests/conftest.py marks slow (by file: notebooks, course notebooks, nbgrader,
# fuzz, browser, Binder venv) are left out; everything else runs.  Not for CI.
check: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests --ignore=tests/test_browser.py

bench: venv
	$(PY) benchmarks/run.py

# pip download of each runtime pin for Linux x86-64/aarch64, macOS arm64/x86-64 and
# Windows x86-64 (network); exits non-zero listing the missing wheels.
wheels: venv
	$(PY) tools/check_wheels.py

# Tests write nothing into the tree: their artifacts and the Binder venv live in
# $(VTLAB_CACHE) (tests/conftest.py); tests/artifacts and .venv-binder are from older runs.
VTLAB_CACHE ?= $(or $(VTLAB_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vtlab)

clean:
	rm -rf build dist *.egg-info .pytest_cache tests/artifacts $(VTLAB_CACHE)/test-artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name .ipynb_checkpoints -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

# --- Teaching with nbgrader (see "Teach with vtlab" in the README) -------------------
#   make notebooks                   sync each source's .ipynb/.py pair (jupytext), make the
#                                    student versions and copy them to notebooks/
#   make assignments                 student versions -> course/release/<assignment>/
#   make autograde SUBMISSIONS=dir [JOBS=N]  grade dir/<student>/<assignment>/<assignment>.ipynb,
#                                    each isolated (tools/autograde.py; AUTOGRADE_ARGS for
#                                    more options), N at a time: course/grades.csv and
#                                    course/attention.csv
#   make validate-assignments        check the instructor solutions pass their tests
# The instructor sources are committed in nbgrader's layout, course/source/<a>/<a>.ipynb,
# each paired with <a>.py by jupytext; nbgrader_config.py holds the settings; everything
# generated lands in course/ beside them (git-ignored); notebooks/ = the learner versions.
COURSE_TOOL := $(PY) tools/nbgrader_course.py
# One file per assignment folder course/source/<a>/: <a>.ipynb, or <a>.py when only the
# script exists yet (a new assignment written as text: `make notebooks` makes its .ipynb).
SOURCES     := $(foreach d,$(sort $(wildcard course/source/*/)),$(firstword \
                 $(wildcard $(d)$(notdir $(d:/=)).ipynb) $(wildcard $(d)$(notdir $(d:/=)).py)))

.PHONY: notebooks

# jupytext --sync first, so that an edit made to either file of a pair is the one used.
notebooks: venv
	$(VENV)/bin/jupytext --sync $(SOURCES)
	$(COURSE_TOOL) generate
	$(COURSE_TOOL) learner

.PHONY: assignments autograde validate-assignments clean-binder

assignments: venv
	$(COURSE_TOOL) generate

autograde: venv
	@test -n "$(SUBMISSIONS)" || { echo "usage: make autograde SUBMISSIONS=dir   (dir/<student>/<assignment>/<assignment>.ipynb)" >&2; exit 2; }
	$(PY) tools/autograde.py "$(SUBMISSIONS)" --jobs $(or $(JOBS),1) $(AUTOGRADE_ARGS)

validate-assignments: venv
	$(COURSE_TOOL) validate

# The course site (MyST / Jupyter Book 2) from the learner notebooks, executed in
# build/site/ (docs/site/build.py); its dependency lives in requirements-site.txt.
# SITE_TEMPLATE=DIR: a book-theme folder, for machines that cannot download it.
.PHONY: site
site: venv
	$(PY) -m pip install -q -r requirements-site.txt
	SITE_TEMPLATE="$(SITE_TEMPLATE)" $(PY) docs/site/build.py

# The Binder test's cached environment (tests/test_binder.py).
clean-binder:
	rm -rf .venv-binder $(VTLAB_CACHE)/binder-venv

distclean: clean-binder
