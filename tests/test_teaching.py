"""docs/TEACHING.md: every step of "Teach with vtlab" that can run without a hub.

- the top-level .dockerignore keeps the instructor side out of the image's build context
  (Docker's own matching rules, simulated; a real ``docker build`` when a daemon answers);
- docs/hub/Dockerfile starts from a date-tagged Docker Stacks image and keeps jovyan;
- the nbgitpuller link has the parameters nbgitpuller reads;
- nbgrader's disable (and lock) commands of the Dockerfile exist in the installed
  nbgrader and JupyterLab, and really disable formgrader and Create Assignment;
- the config snippets (nbgrader_config.py, Zero to JupyterHub values) parse;
- (marked ``site``, left out of ``make check``) ngshare_exchange, installed as the
  Dockerfile installs it, works with the pinned nbgrader.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HUB = REPO / "docs" / "hub"
TEACHING = REPO / "docs" / "TEACHING.md"
DOCKERFILE = HUB / "Dockerfile"
BIN = Path(sys.executable).parent


# =========================================================================== .dockerignore
def _dockerignore_patterns(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line of a .dockerignore, as Docker's patternmatcher reads it:
    comments and blank lines dropped, a leading "/" and "./" removed, ``**`` any number of
    folders, ``*`` and ``?`` within one path element, "!" re-includes."""
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        if neg:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line.startswith("./"):
            line = line[2:]
        rx, i = "", 0
        while i < len(line):
            ch = line[i]
            if line.startswith("**", i):
                i += 2
                if line.startswith("/", i):
                    rx += "(?:.*/)?"
                    i += 1
                else:
                    rx += ".*"
                continue
            rx += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
            i += 1
        out.append((neg, re.compile(f"^{rx}$")))
    return out


def _excluded(rel: str, patterns) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders
    decides (MatchesOrParentMatches)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, rx in patterns:
        if any(rx.match(c) for c in candidates):
            excluded = not neg
    return excluded


def test_the_matcher_follows_dockers_rules():
    pats = [(False, re.compile("^[^/]*$")), (True, re.compile("^vtlab$")), (False, re.compile("^(?:.*/)?__pycache__$"))]
    assert _excluded("course/x", pats) and not _excluded("vtlab/a.py", pats)
    assert _excluded("vtlab/cpu/__pycache__/a.pyc", pats)


#: Paths that must never reach the image (the issue's list and what nbgrader makes).
NEVER = [
    "course/source/01_rings/01_rings.ipynb", "course/source/01_rings/01_rings.py",
    "course/source/jupytext.toml", "course/gradebook.db", "gradebook.db",
    "course/submitted/alice/01_rings/01_rings.ipynb", "course/autograded/alice/01_rings/01_rings.ipynb",
    "course/feedback/alice/01_rings/01_rings.html", "course/release/01_rings/01_rings.ipynb",
    "course/grades.csv", "course/attention.csv", "submitted/alice/01_rings/01_rings.ipynb",
    "autograded/alice/01_rings/01_rings.ipynb", "feedback/alice/01_rings/01_rings.html",
    "source/01_rings/01_rings.ipynb", "solutions/01_rings.ipynb",
    ".venv/bin/python", ".venv-binder/bin/python", ".git/HEAD",
    "tests/fixtures/grading/source/tiny/tiny.ipynb", "tools/autograde.py",
    "vtlab/__pycache__/x.cpython-311.pyc", "notebooks/.ipynb_checkpoints/01_rings-checkpoint.ipynb",
]
#: Paths the Dockerfile copies.
NEEDED = ["vtlab/__init__.py", "vtlab/cpu/guest.py", "pyproject.toml", "README.md", "LICENSE",
          "binder/requirements.txt", "docs/hub/requirements.txt", "docs/hub/nbgrader_config.py"]


def test_dockerignore_keeps_the_instructor_side_out():
    pats = _dockerignore_patterns(REPO / ".dockerignore")
    leaked = [p for p in NEVER if not _excluded(p, pats)]
    assert not leaked, f".dockerignore lets these into the build context: {leaked}"
    missing = [p for p in NEEDED if _excluded(p, pats)]
    assert not missing, f".dockerignore leaves out what docs/hub/Dockerfile copies: {missing}"


def test_dockerignore_covers_every_file_of_the_repository_that_holds_solutions():
    """Whatever is in the tree now: no notebook with a solution or hidden tests gets in."""
    pats = _dockerignore_patterns(REPO / ".dockerignore")
    offenders = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith((".venv", ".git", "node_modules"))]
        for name in files:
            path = Path(folder) / name
            if path.suffix not in (".ipynb", ".py", ".md"):
                continue
            rel = path.relative_to(REPO).as_posix()
            text = path.read_text(encoding="utf-8", errors="replace")
            if ("BEGIN SOLUTION" in text or "BEGIN HIDDEN TESTS" in text) and not _excluded(rel, pats):
                offenders.append(rel)
    assert not offenders, f"files with nbgrader solution/hidden-test markers reach the image: {offenders}"


def test_dockerfile_copies_only_what_the_context_has():
    pats = _dockerignore_patterns(REPO / ".dockerignore")
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY"):
            words = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
            for src in words[:-1]:
                assert (REPO / src).exists(), f"{src} (docs/hub/Dockerfile) does not exist"
                assert not _excluded(src, pats), f"{src} is copied but .dockerignore leaves it out"


def _docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    return r.returncode == 0 and bool(r.stdout.strip())


@pytest.mark.site
def test_docker_build_context_has_no_course(tmp_path):
    if not _docker_works():
        pytest.skip("no Docker daemon answers here; the .dockerignore rules are checked by simulation above")
    probe = tmp_path / "Dockerfile"
    probe.write_text("FROM busybox\nCOPY . /ctx\nRUN find /ctx -type f > /files.txt\nCMD cat /files.txt\n")
    subprocess.run(["docker", "build", "-q", "-f", str(probe), "-t", "vtlab-context-probe", str(REPO)], check=True)
    files = subprocess.run(["docker", "run", "--rm", "vtlab-context-probe"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert not [f for f in files if "/course/" in f or "/.venv/" in f or f.endswith(".ipynb")], files


# =========================================================================== Dockerfile
def _base_image() -> str:
    text = DOCKERFILE.read_text(encoding="utf-8")
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert m, "docs/hub/Dockerfile has no ARG BASE_IMAGE=<image>"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), "FROM must use the BASE_IMAGE argument"
    return m.group(1)


def test_base_image_is_a_date_tagged_docker_stacks_image():
    image = _base_image()
    name, _, tag = image.rpartition(":")
    assert name.startswith("quay.io/jupyter/"), image
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", tag), f"{image}: not a date tag (YYYY-MM-DD)"
    date = datetime.date.fromisoformat(tag)
    assert date <= datetime.date.today(), f"{image}: a date in the future"
    assert tag in TEACHING.read_text(encoding="utf-8"), "docs/TEACHING.md names another base image"


def test_the_image_keeps_jovyan():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"^\s*(ENV|ARG)\s+NB_(USER|UID)\b", text, re.M), "the Dockerfile must not change NB_USER/NB_UID"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] == "${NB_UID}", "the image must end as the notebook user"
    assert "/home/${NB_USER}/" not in text.split("WORKDIR /home/${NB_USER}")[0].split("COPY", 1)[-1], \
        "nothing is copied into the home that a persistent volume hides"
    assert "--user-name jovyan" in TEACHING.read_text(encoding="utf-8")


# =========================================================================== nbgitpuller
def _nbgitpuller_links() -> list[str]:
    return re.findall(r"https://\S+/hub/user-redirect/git-pull\?\S+", TEACHING.read_text(encoding="utf-8"))


def test_nbgitpuller_link_format():
    (link,) = _nbgitpuller_links()
    url = urllib.parse.urlsplit(link)
    assert url.scheme == "https" and url.path == "/hub/user-redirect/git-pull"
    q = urllib.parse.parse_qs(url.query, strict_parsing=True)
    assert set(q) <= {"repo", "branch", "urlpath", "targetpath", "depth"}, sorted(q)
    assert {"repo", "branch", "urlpath"} <= set(q)
    repo = urllib.parse.urlsplit(q["repo"][0])
    assert repo.scheme == "https" and repo.path.count("/") == 2, q["repo"]
    assert "%2F" in link, "the parameters are URL-encoded"
    target = q.get("targetpath", [repo.path.rsplit("/", 1)[-1]])[0]
    urlpath = q["urlpath"][0]
    assert urlpath.startswith(f"lab/tree/{target}/"), urlpath
    # The learner branch has notebooks/ as its root (git subtree split --prefix notebooks).
    notebook = urlpath[len(f"lab/tree/{target}/"):]
    assert (REPO / "notebooks" / notebook).is_file(), f"{notebook} is not a learner notebook"
    assert "git subtree split --prefix notebooks" in TEACHING.read_text(encoding="utf-8")


@pytest.mark.site
def test_nbgitpuller_reads_those_parameters(tmp_path):
    """nbgitpuller at the hub image's pin (installed --no-deps into a folder) reads the
    link's parameters by those names."""
    pin = next(ln.strip() for ln in (HUB / "requirements.txt").read_text().splitlines()
               if ln.startswith("nbgitpuller=="))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path), pin],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"cannot install {pin} here (no package index?): {r.stderr.strip()[-200:]}")
    source = (tmp_path / "nbgitpuller" / "handlers.py").read_text(encoding="utf-8")
    (link,) = _nbgitpuller_links()
    for name in urllib.parse.parse_qs(urllib.parse.urlsplit(link).query):
        assert f"get_argument('{name}'" in source or f'get_argument("{name}"' in source, name
    assert "user-redirect/git-pull" in link and "git-pull" in source


# =========================================================================== nbgrader for students
def _dockerfile_commands(prefix: str) -> list[list[str]]:
    """The Dockerfile's commands starting with *prefix*, split into words."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    return [cmd.split() for cmd in re.findall(rf"{re.escape(prefix)}(?: [^\s;&\\]+)+", text)]


def test_the_disable_commands_are_in_the_dockerfile_and_the_guide():
    guide = TEACHING.read_text(encoding="utf-8")
    server = _dockerfile_commands("jupyter server extension disable")
    lab = _dockerfile_commands("jupyter labextension disable")
    lock = _dockerfile_commands("jupyter labextension lock")
    assert [c[-1] for c in server] == ["nbgrader.server_extensions.formgrader"]
    assert sorted(c[-1] for c in lab) == ["@jupyter/nbgrader:create-assignment", "@jupyter/nbgrader:formgrader"]
    assert sorted(lock[0][-2:]) == ["@jupyter/nbgrader:create-assignment", "@jupyter/nbgrader:formgrader"]
    for cmd in server + lab + lock:
        assert shlex.join(cmd) in guide, f"docs/TEACHING.md lacks: {shlex.join(cmd)}"


def test_the_disable_commands_work_on_the_installed_nbgrader(tmp_path):
    """Run the Dockerfile's commands at --user level on a copy of the installed nbgrader's
    server configuration (what --sys-prefix finds in the image) and read the outcome."""
    import nbgrader

    installed = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "nbgrader.json"
    assert installed.is_file(), f"nbgrader {nbgrader.__version__} did not install {installed}"
    (tmp_path / "jupyter_server_config.d").mkdir()
    shutil.copy(installed, tmp_path / "jupyter_server_config.d" / "nbgrader.json")
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    commands = (_dockerfile_commands("jupyter server extension disable") + _dockerfile_commands("jupyter labextension disable")
                + _dockerfile_commands("jupyter labextension lock"))
    for cmd in commands:
        cmd = [w.replace("--sys-prefix", "--user").replace("--level=sys_prefix", "--level=user") for w in cmd]
        r = subprocess.run([str(BIN / "jupyter"), *cmd[1:]], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Validation failed" not in r.stdout + r.stderr, (cmd, r.stdout, r.stderr)

    from jupyter_server.extension.config import ExtensionConfigManager

    effective = ExtensionConfigManager(read_config_path=[str(tmp_path)]).get_jpserver_extensions()
    assert effective["nbgrader.server_extensions.formgrader"] is False
    assert effective["nbgrader.server_extensions.assignment_list"] is True  # students keep Assignments
    assert effective["nbgrader.server_extensions.validate_assignment"] is True
    page = json.loads((tmp_path / "labconfig" / "page_config.json").read_text())
    for plugin in ("@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment"):
        assert page["disabledExtensions"][plugin] is True and page["lockedExtensions"][plugin] is True
    # ... and those plugin ids are nbgrader's own (its lab extension's plugins).
    ext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@jupyter" / "nbgrader"
    js = "".join(p.read_text(encoding="utf-8", errors="replace") for p in ext.rglob("*.js"))
    for plugin in ("@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment"):
        assert plugin in js, f"{plugin} is not a plugin of the installed nbgrader lab extension"


# =========================================================================== config snippets
def test_the_hub_nbgrader_config_parses():
    from traitlets.config.loader import PyFileConfigLoader

    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(HUB)).load_config()
    assert cfg.CourseDirectory.course_id == "vtlab"


def test_the_zero_to_jupyterhub_values_parse():
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((HUB / "config.yaml").read_text(encoding="utf-8"))
    single = values["singleuser"]
    assert single["uid"] == 1000
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(single["image"]["tag"])), "push and use a date tag"
    assert "ngshare" in values["hub"]["services"]
    assert single["extraEnv"]["NGSHARE_URL"].startswith(values["hub"]["services"]["ngshare"]["url"])


def test_the_hub_requirements_are_pinned():
    lines = [ln.split("#")[0].strip() for ln in (HUB / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", ln) for ln in lines), lines


def test_the_readme_points_to_the_guide():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Teach with vtlab", 1)[1]
    assert "docs/TEACHING.md" in section


@pytest.mark.site
def test_ngshare_exchange_as_the_image_installs_it_works_with_the_pinned_nbgrader(tmp_path):
    """pip install --no-deps ngshare_exchange (the Dockerfile's line) into a folder, then
    load docs/hub/nbgrader_config.py with it: nbgrader's exchange factory gets ngshare's
    classes, each a complete implementation of nbgrader's exchange interface."""
    spec = re.search(r"--no-deps (ngshare_exchange==\S+)", DOCKERFILE.read_text(encoding="utf-8")).group(1)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "pkgs"), spec],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"cannot install {spec} here (no package index?): {r.stderr.strip()[-200:]}")
    code = (
        "from traitlets.config.loader import PyFileConfigLoader\n"
        "import nbgrader.exchange.abc as abc\n"
        f"cfg = PyFileConfigLoader('nbgrader_config.py', path={str(HUB)!r}).load_config()\n"
        "f = cfg.ExchangeFactory\n"
        "names = {'fetch_assignment': 'ExchangeFetchAssignment', 'submit': 'ExchangeSubmit',\n"
        "         'collect': 'ExchangeCollect', 'list': 'ExchangeList', 'release_assignment': 'ExchangeReleaseAssignment',\n"
        "         'fetch_feedback': 'ExchangeFetchFeedback', 'release_feedback': 'ExchangeReleaseFeedback'}\n"
        "for key, base in names.items():\n"
        "    cls = f[key]\n"
        "    assert cls.__module__.startswith('ngshare_exchange'), (key, cls)\n"
        "    assert issubclass(cls, getattr(abc, base)) and not getattr(cls, '__abstractmethods__', None), key\n"
        "print(f['exchange']._ngshare_url)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkgs"), JUPYTERHUB_USER="jovyan")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "http://ngshare.jhub.svc.cluster.local:8080/services/ngshare"


# =========================================================================== the course site
def _myst_available() -> bool:
    try:
        import mystmd_py  # noqa: F401  (requirements-site.txt)
    except ImportError:
        return False
    return shutil.which("node") is not None


def test_site_config_has_launch_buttons_and_every_learner_notebook():
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((REPO / "docs" / "site" / "myst.yml").read_text(encoding="utf-8"))
    project = cfg["project"]
    assert project["binder"].startswith("https://mybinder.org/v2/gh/")
    assert "urlpath=lab/tree/notebooks/" in project["binder"], "Binder opens the learner versions"
    assert project["jupyter"]["binder"]["repo"]
    toc = [entry["file"] for entry in project["toc"]]
    learner = sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(t for t in toc if t.endswith(".ipynb")) == learner
    assert "mystmd==" in (REPO / "requirements-site.txt").read_text()
    assert "mystmd" not in (REPO / "requirements.txt").read_text()


@pytest.mark.site
def test_the_site_builds_from_executed_learner_notebooks(tmp_path):
    """docs/site/build.py executes the learner versions in a build folder and builds the
    MyST site: every page's content, and the HTML when mystmd's theme can be had."""
    if not _myst_available():
        pytest.skip("mystmd is not installed (make site installs requirements-site.txt)")
    before = {p: p.stat().st_mtime for p in (REPO / "notebooks").glob("*.ipynb")}
    out = tmp_path / "site"
    r = subprocess.run([sys.executable, str(REPO / "docs" / "site" / "build.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert {p: p.stat().st_mtime for p in (REPO / "notebooks").glob("*.ipynb")} == before, "the tree was written"
    content = out / "src" / "_build" / "site" / "content"
    pages = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in content.glob("*.json")}
    for nb in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        # mystmd names a page after the notebook without its number: 01_rings -> rings
        slug = re.sub(r"^\d+_", "", nb.stem).replace("_", "-")
        key = next((k for k in pages if k == slug), None)
        assert key, f"no page for {nb.name}: {sorted(pages)}"
        text = json.dumps(pages[key])
        assert '"type": "output"' in text or '"type":"output"' in text.replace(" ", ""), f"{nb.name}: no outputs"
        assert "BEGIN SOLUTION" not in text and "BEGIN HIDDEN TESTS" not in text
    if r.returncode == 3:
        pytest.skip("page content built; mystmd's HTML theme cannot be downloaded here: "
                    + next((ln for ln in r.stderr.splitlines() if ln.startswith("site:")), "(no message)")[:300])
    html = (out / "src" / "_build" / "html" / "index.html").read_text(encoding="utf-8")
    assert "mybinder.org" in html
    for page in (out / "src" / "_build" / "html").rglob("*.html"):
        for img in re.findall(r"<img\b[^>]*>", page.read_text(encoding="utf-8")):
            assert re.search(r'\balt="[^"]+"', img), f"{page.name}: image without alt text: {img[:120]}"
