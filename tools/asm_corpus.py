"""Collect the assembly corpus of the course and record its machine code as a fixture.

The corpus is every program the course assembles: the workloads in vtlab/lab/guests/,
the ring-lab probes and worlds, the binary-translation stubs, the guests written in the
notebooks (tools/notebooks/*.py builds them) and the programs the tests assemble.  Rather
than guess those texts from the source files (many are built by f-strings at run time),
this script *watches* them being assembled: it runs the test suite - and through it the
notebooks, in their own kernels - with a small recorder that sees every successful call
of ``vtlab.cpu.asm._assemble(source, address, bits)`` and writes it down with the bytes
that came out.

The fixture (tests/fixtures/asm_corpus.json) was recorded with Keystone 0.9.2, before
the assembler was replaced by LLVM's (issue #14); tests/test_asm_corpus.py assembles
every entry again and compares.  Usage::

    python tools/asm_corpus.py record            # the default selection of tests
    python tools/asm_corpus.py record tests/test_rings.py   # or any pytest arguments
    python tools/asm_corpus.py stats             # what the fixture holds

How the recorder reaches other processes: ``record`` puts a ``sitecustomize.py`` on
``PYTHONPATH`` (in a temporary folder); Python imports it at start-up in the test
process and in every child (notebook kernels, CLI runs), and it wraps ``_assemble`` as
soon as ``vtlab.cpu.asm`` is imported.  Each process appends JSON lines to one log
file; ``record`` then merges them, removes duplicates and writes the fixture.
Programs that fail to assemble are not recorded (the error tests have their own file),
nor are the random "garbage" programs of the property tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "asm_corpus.json"

#: Tests that assemble the course's programs.  Left out: the browser and Binder tests
#: (they repeat the notebooks, slowly), the fuzz test (random programs) and the two
#: property tests of test_asm_errors that feed the assembler random garbage.
DEFAULT_PYTEST_ARGS = [
    "tests", "--ignore=tests/test_browser.py", "--ignore=tests/test_binder.py",
    "--ignore=tests/test_fuzz.py", "--ignore=tests/test_nbgrader.py",
    "-k", "not random_garbage and not never_sees",
    "-q", "-p", "no:cacheprovider",
]

#: The recorder, written to a temporary sitecustomize.py (runs in every process).
_SITECUSTOMIZE = textwrap.dedent('''
    """vtlab asm corpus recorder (tools/asm_corpus.py): wraps vtlab.cpu.asm._assemble."""
    import importlib.abc, json, os, sys, traceback

    _LOG = os.environ.get("VTLAB_ASM_CORPUS_LOG")
    _SEEN = set()

    def _where():
        """The first caller outside vtlab/cpu and vtlab/vmm: where the program comes from."""
        if os.environ.get("VTLAB_ASM_CORPUS_WHERE"):
            return os.environ["VTLAB_ASM_CORPUS_WHERE"]
        for frame in reversed(traceback.extract_stack()[:-3]):
            name = frame.filename.replace(os.sep, "/")
            if "/vtlab/cpu/" in name or "/vtlab/vmm/" in name or "functools" in name:
                continue
            if "ipykernel" in name or name.startswith("<"):
                return "notebook cell"
            for root in ("/vtlab/", "/tests/", "/tools/"):
                if root in name:
                    return root.strip("/") + "/" + name.split(root, 1)[1] + ":" + frame.name
        return "?"

    def _wrap(module):
        real = module._assemble
        def recording(source, address, bits):
            code = real(source, address, bits)  # an error propagates: not recorded
            key = (source, address, bits)
            if key not in _SEEN:
                _SEEN.add(key)
                entry = {"source": source, "address": address, "bits": bits,
                         "code": bytes(code).hex(), "where": _where()}
                with open(_LOG, "a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\\n")
            return code
        module._assemble = recording

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "vtlab.cpu.asm":
                return None
            sys.meta_path.remove(self)
            try:
                import importlib.util
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                _wrap(module)
            spec.loader.exec_module = exec_module
            return spec

    if _LOG:
        sys.meta_path.insert(0, _Finder())
''')


def _read_log(path: Path) -> list[dict]:
    """The log's entries, duplicates (same source, address, bits) removed, first kept."""
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        key = (entry["source"], entry["address"], entry["bits"])
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def _workloads() -> list[tuple[str, int, int]]:
    """Every workload of vtlab/lab/guests as (source, address, bits), assembled directly."""
    from vtlab.lab import guests

    return [(guests.source(name), guests.info(name).load, guests.info(name).bits)
            for name in guests.names()]


def record(pytest_args: list[str]) -> int:
    """Run pytest with the recorder and write :data:`FIXTURE`; pytest's exit code."""
    with tempfile.TemporaryDirectory(prefix="vtlab-asm-corpus-") as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
        log = Path(tmp) / "corpus.jsonl"
        log.touch()
        path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, VTLAB_ASM_CORPUS_LOG=str(log), PYTHONPATH=path)
        # The workloads first, so they are named as such (not after the test that ran them).
        code = "import sys; sys.path.insert(0, %r)\n" % str(REPO) + textwrap.dedent("""
            from tools.asm_corpus import _workloads
            from vtlab.cpu import asm
            for source, address, bits in _workloads():
                asm.assemble(source, address, bits)
        """)
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                       env=dict(env, VTLAB_ASM_CORPUS_WHERE="vtlab/lab/guests/*.asm"))
        result = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=REPO)
        entries = _read_log(log)
    write_fixture(entries)
    print(f"{len(entries)} programs recorded in {FIXTURE.relative_to(REPO)} "
          f"({FIXTURE.stat().st_size:,} bytes); pytest exit code {result.returncode}")
    return result.returncode


def write_fixture(entries: list[dict]) -> None:
    """Write ``entries`` (sorted, for stable diffs) with a note on what they are."""
    entries = sorted(entries, key=lambda e: (e["where"], e["bits"], e["address"], e["source"]))
    data = {
        "about": ("Programs the course assembles, with the bytes the assembler named in "
                  "recorded_with made of them (Keystone 0.9.2 was vtlab's assembler before "
                  "issue #14); recorded by tools/asm_corpus.py, checked by "
                  "tests/test_asm_corpus.py"),
        "recorded_with": _assembler_version(),
        "programs": entries,
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FIXTURE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, FIXTURE)


def _assembler_version() -> str:
    try:
        import keystone
        return f"keystone {getattr(keystone, '__version__', '0.9.2')}"
    except ImportError:
        from vtlab.cpu import asm
        return asm.assembler_version()


def stats() -> None:
    """Print how many programs the fixture holds, by where they come from."""
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    for entry in data["programs"]:
        where = entry["where"].split(":")[0]
        counts[where] = counts.get(where, 0) + 1
    for where, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n:6}  {where}")
    print(f"{len(data['programs']):6}  programs, {FIXTURE.stat().st_size:,} bytes")


def main(argv: list[str]) -> int:
    if argv[:1] == ["stats"]:
        stats()
        return 0
    if argv[:1] == ["record"]:
        return record(argv[1:] or DEFAULT_PYTEST_ARGS)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
