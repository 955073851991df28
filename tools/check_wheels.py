#!/usr/bin/env python3
"""Does every runtime dependency install from a wheel on the five laptop platforms?

    python tools/check_wheels.py                 # vtlab's runtime dependencies, at their pins
    python tools/check_wheels.py --all           # every pin in requirements.txt
    python tools/check_wheels.py --extra ziglang # also an extra package (latest, or NAME==VER)

For each package and platform it runs

    pip download --only-binary=:all: --no-deps --dest TMP --platform TAG ...
                 --python-version 3.11 --implementation cp NAME==PIN

and prints a table of the wheel pip picked (``py3-none-any`` wheels count: they run
everywhere).  The exit status is 1, with the failures listed, if any package has no
wheel for any platform; a student on that platform would need a compiler (or fail).

*Which packages*: the runtime dependencies are the names in ``pyproject.toml``'s
``[project] dependencies`` (what vtlab imports when it runs); their versions are the
exact pins of ``requirements.txt``, which is what the tests ran with.  ``--all`` checks
every pin of requirements.txt (JupyterLab, the test tools ...) instead.

*Which platforms*: Linux x86-64 and aarch64 (glibc 2.17 to 2.28: any distribution from
2018 on, Docker on Apple silicon, ARM hubs), macOS arm64 (11+) and x86-64 (10.15+),
Windows x86-64.  pip does not widen a ``manylinux_2_28`` tag to older glibc versions by
itself, so each Linux column passes every ``manylinux_2_x`` tag from 2_17 to 2_28.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _manylinux(arch: str) -> tuple[str, ...]:
    """manylinux2014 (= manylinux_2_17) up to manylinux_2_28 for ``arch``, newest first."""
    return tuple(f"manylinux_2_{minor}_{arch}" for minor in range(28, 16, -1)) + (f"manylinux2014_{arch}",)


#: label -> the --platform tags pip may pick a wheel for (pip widens macOS tags to older
#: macOS versions and universal2 itself).  The oldest macOS vtlab supports is 13 (Ventura,
#: 2022): ziglang 0.17's wheels, the assembler, need it; every Mac Apple still updates is newer.
PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux-x86_64": _manylinux("x86_64"),
    "linux-aarch64": _manylinux("aarch64"),
    "macos-arm64": ("macosx_13_0_arm64",),
    "macos-x86_64": ("macosx_13_0_x86_64",),
    "win-amd64": ("win_amd64",),
}


# ------------------------------------------------------------------ requirement files
def normalize(name: str) -> str:
    """PEP 503 normal form: ``Keystone_Engine`` -> ``keystone-engine``."""
    return re.sub(r"[-_.]+", "-", name).lower()


_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;#,]+)\s*(?:;.*)?")
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def parse_pins(text: str) -> dict[str, str]:
    """The exact pins (``name==version``) of a requirements file, by normalized name.

    Comments (whole-line and `` # ...`` after a requirement) and blank lines are skipped;
    so are lines that are not an exact pin (``-r other.txt``, ``.``, ``pkg>=1``) - they pin
    nothing to check.  Environment markers (``; sys_platform == ...``) are dropped.
    """
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()   # a "#" never occurs in a name or version
        m = _PIN.fullmatch(line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def runtime_names(pyproject_text: str) -> list[str]:
    """Normalized names in ``[project] dependencies`` of a pyproject.toml, in order."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: read the array with a regex instead
        tomllib = None
    if tomllib is not None:
        deps = tomllib.loads(pyproject_text).get("project", {}).get("dependencies", [])
    else:
        block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", pyproject_text, re.S | re.M)
        deps = re.findall(r"""["']([^"']+)["']""", block.group(1)) if block else []
    names = []
    for dep in deps:
        m = _NAME.match(dep)
        if m:
            names.append(normalize(m.group(1)))
    return names


def select(pins: dict[str, str], names: list[str] | None) -> tuple[list[str], list[str]]:
    """(``name==pin`` specs to check, names that have no pin) for ``names`` (None: all)."""
    if names is None:
        return [f"{n}=={v}" for n, v in pins.items()], []
    return [f"{n}=={pins[n]}" for n in names if n in pins], [n for n in names if n not in pins]


# ------------------------------------------------------------------ pip download
@dataclass
class Result:
    """What pip found for one package on one platform."""
    spec: str
    platform: str
    wheel: str | None   # the file name, None if pip found none
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.wheel is not None

    @property
    def cell(self) -> str:
        """Short table text: the version and tags of the wheel (``2.1.4 py3-none-any``)."""
        if self.wheel is None:
            return "NO WHEEL"
        parts = self.wheel[:-len(".whl")].split("-")
        version, tags = parts[1], parts[-3:]   # name-version[-build]-python-abi-platform
        if tags[1:] == ["none", "any"]:
            return f"{version} any"
        plat = tags[2].split(".")[0]  # first of a compressed tag set, e.g. manylinux1_x86_64
        plat = re.sub(r"_(x86_64|aarch64|arm64|amd64|universal2|intel)$", "", plat)
        return f"{version} {tags[0]} {plat}"


def download(spec: str, platform: str, python_version: str = "3.11") -> Result:
    """Ask pip for a wheel of ``spec`` (``name==version`` or a bare name) for ``platform``."""
    with tempfile.TemporaryDirectory(prefix="vtlab-wheels-") as dest:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
               "--only-binary=:all:", "--no-deps", "--dest", dest,
               "--python-version", python_version, "--implementation", "cp"]
        for tag in PLATFORMS[platform]:
            cmd += ["--platform", tag]
        proc = subprocess.run(cmd + [spec], capture_output=True, text=True, timeout=900)
        wheels = sorted(p.name for p in Path(dest).glob("*.whl"))
        if proc.returncode == 0 and wheels:
            return Result(spec, platform, wheels[0])
        # pip's last ERROR line says why (no matching distribution, network ...)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR")]
        return Result(spec, platform, None, (errors or proc.stderr.splitlines() or ["?"])[-1])


def check(specs: list[str], platforms: list[str], python_version: str = "3.11",
          jobs: int = 4) -> list[Result]:
    """Every (spec, platform) pair, downloaded ``jobs`` at a time (pip waits on the network)."""
    pairs = [(s, p) for s in specs for p in platforms]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda sp: download(sp[0], sp[1], python_version), pairs))


def table(results: list[Result], platforms: list[str]) -> str:
    """A plain-text table: one row per package, one column per platform."""
    specs = list(dict.fromkeys(r.spec for r in results))
    by = {(r.spec, r.platform): r for r in results}
    rows = [["package", *platforms]] + [[s, *(by[s, p].cell for p in platforms)] for s in specs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requirements", type=Path, default=REPO / "requirements.txt")
    ap.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    ap.add_argument("--all", action="store_true", help="every pin of requirements.txt, not only the runtime ones")
    ap.add_argument("--extra", action="append", default=[], metavar="SPEC",
                    help="also check SPEC (NAME==VERSION, or NAME for the latest release)")
    ap.add_argument("--platform", action="append", choices=list(PLATFORMS), help="only these platforms")
    ap.add_argument("--macos", metavar="MAJOR_MINOR",
                    help="oldest macOS to support for both Macs, e.g. 14_0 (default: 13_0)")
    ap.add_argument("--python-version", default="3.11")
    ap.add_argument("--jobs", type=int, default=4)
    args = ap.parse_args(argv)

    if args.macos:
        PLATFORMS["macos-arm64"] = (f"macosx_{args.macos}_arm64",)
        PLATFORMS["macos-x86_64"] = (f"macosx_{args.macos}_x86_64",)
    pins = parse_pins(args.requirements.read_text(encoding="utf-8"))
    names = None if args.all else runtime_names(args.pyproject.read_text(encoding="utf-8"))
    specs, unpinned = select(pins, names)
    specs += args.extra
    platforms = args.platform or list(PLATFORMS)
    results = check(specs, platforms, args.python_version, args.jobs)
    print(f"wheels for CPython {args.python_version} ({len(specs)} packages x {len(platforms)} platforms; "
          f"oldest macOS: {PLATFORMS['macos-arm64'][0]}, {PLATFORMS['macos-x86_64'][0]})")
    print(table(results, platforms))
    failed = [r for r in results if not r.ok]
    for name in unpinned:
        print(f"NOT PINNED: {name} is a runtime dependency in pyproject.toml but has no "
              f"`{name}==VERSION` line in {args.requirements.name}")
    if failed:
        print(f"\n{len(failed)} missing wheel(s):")
        for r in failed:
            print(f"  {r.spec} on {r.platform}: {r.error}")
    return 1 if failed or unpinned else 0


if __name__ == "__main__":
    raise SystemExit(main())
