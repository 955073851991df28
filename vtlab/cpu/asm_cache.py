"""A small on-disk cache of assembled programs, shared by every Python process.

Assembling with LLVM starts a process (about 10 ms); the test suite and a notebook
session assemble the same few hundred programs again and again, so the results of
:func:`vtlab.cpu.asm.assemble` are kept in files named after a SHA-256 of
(assembler version, bits, address, source text).  The version covers the ziglang
wheel *and* the source of vtlab's assembler modules, so a change to either starts
afresh instead of serving stale bytes.

* Where: ``$VTLAB_ASM_CACHE`` if it names a folder, else ``~/.cache/vtlab/asm``
  (``$XDG_CACHE_HOME/vtlab/asm``).  ``VTLAB_ASM_CACHE=off`` (or ``0``, ``no``) turns the
  cache off.  Deleting the folder at any time is safe.
* Small: entries live in one folder per assembler version; the folders of other
  versions that have not been written to for a day are removed (once per process,
  when the first entry is written).
* Safe: an entry is written to a temporary file in the same folder and renamed into
  place (:func:`os.replace` is atomic), so a reader sees a whole entry or none, even
  with several processes at once.  A file that does not look like an entry is ignored,
  and any error of the file system (read-only home, full disk) just means "not cached".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from functools import cache
from pathlib import Path

_MAGIC = b"vtlab-asm 1\n"
_OFF = {"off", "0", "no", "false", "none"}
_STALE = 24 * 3600  # seconds without a write after which another version's folder goes


@cache
def folder() -> Path | None:
    """The cache folder (None when the cache is turned off)."""
    setting = os.environ.get("VTLAB_ASM_CACHE", "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vtlab" / "asm"


def key(version: str, source: str, address: int, bits: int) -> str:
    """The name of the entry for one program: ``<version digest>/<SHA-256>``."""
    blob = json.dumps([version, bits, address, source], ensure_ascii=False)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()
    return f"{hashlib.sha256(version.encode('utf-8')).hexdigest()[:16]}/{digest}"


def _path(name: str) -> Path | None:
    where = folder()
    if where is None:
        return None
    version, _, digest = name.rpartition("/")
    return where / version / digest[:2] / f"{digest}.bin"


@cache
def _prune(current: str) -> None:
    """Remove the folders of other assembler versions not written to for a day."""
    where = folder()
    try:
        for child in where.iterdir():
            if child.is_dir() and child.name != current and (
                    time.time() - child.stat().st_mtime > _STALE):
                shutil.rmtree(child, ignore_errors=True)
    except OSError:
        pass


def load(name: str) -> bytes | tuple[str, int | None] | None:
    """The cached result: the code (bytes), an error (message, line), or None if absent."""
    path = _path(name)
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(_MAGIC):
        return None
    kind, body = data[len(_MAGIC):len(_MAGIC) + 1], data[len(_MAGIC) + 1:]
    if kind == b"C":
        return body
    if kind == b"E":
        try:
            message, line = json.loads(body.decode("utf-8"))
            return str(message), line if isinstance(line, int) else None
        except (ValueError, TypeError):
            return None
    return None


def _write(name: str, payload: bytes) -> None:
    path = _path(name)
    if path is None:
        return
    _prune(path.parent.parent.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".bin")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(_MAGIC + payload)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # a cache that cannot be written is simply not used


def store_code(name: str, code: bytes) -> None:
    """Remember that the program assembled to ``code``."""
    _write(name, b"C" + bytes(code))


def store_error(name: str, message: str, line: int | None) -> None:
    """Remember that the program failed with ``message`` on ``line``."""
    _write(name, b"E" + json.dumps([message, line]).encode("utf-8"))
