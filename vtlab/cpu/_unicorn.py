"""The one check that the installed Unicorn binding is one vtlab can drive.

vtlab's hot paths (register access, memory reads, ``emu_start``, the native instruction
counter, the raw code hook of the sensitive instructions) bypass the binding's Python
wrappers and call the C library through the binding's *private* ctypes layer,
``unicorn.unicorn_py3.unicorn``: its ``uclib`` handle and prototypes, ``uc_hook_h``,
``HOOK_CODE_CFUNC`` and each engine's ``Uc._uch``.  That layer appeared with the
binding rewrite of Unicorn 2.1 and is not a public API, so vtlab pins the 2.1 series
(``pyproject.toml``) and checks here, once, when :mod:`vtlab.cpu` is imported: a wrong
binding then fails with one clear ImportError instead of an AttributeError deep in a run.
"""
from __future__ import annotations

import unicorn

#: The binding series vtlab is written for (see pyproject.toml; keep the two in step).
REQUIRED = "unicorn>=2.1.3,<2.2"
#: 2.1.3: the first 2.1 release with ``Uc.ctl_set_tcg_buffer_size`` (2.1.2) and a
#: correct RDTSCP instruction length (2.1.2 reports a wrong one; tests/test_exits.py).
MINIMUM = (2, 1, 3)

#: Names of the private ctypes layer vtlab uses (module attributes and C functions).
_MODULE_NAMES = ("uclib", "uc_hook_h", "HOOK_CODE_CFUNC", "Uc")
_C_FUNCTIONS = ("uc_emu_start", "uc_emu_stop", "uc_hook_add", "uc_mem_read", "uc_reg_read",
                "uc_reg_write", "uc_reg_read_batch", "uc_reg_write_batch")
_UC_METHODS = ("ctl_set_tcg_buffer_size", "ctl_exits_enabled", "ctl_set_exits",
               "ctl_remove_cache", "ctl_flush_tb")


def _version_tuple(text: str) -> tuple[int, ...]:
    """``"2.1.4"`` -> (2, 1, 4); stops at the first part that is not a number (``post1``)."""
    parts: list[int] = []
    for part in text.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def binding_problem(module=None, version: str | None = None) -> str | None:
    """What is wrong with the installed binding for vtlab, or None if nothing is.

    ``module`` and ``version`` stand in for ``unicorn.unicorn_py3.unicorn`` and
    ``unicorn.__version__`` (tests pass fakes).
    """
    version = unicorn.__version__ if version is None else version
    if module is None:
        try:
            from unicorn.unicorn_py3 import unicorn as module
        except ImportError:
            return f"it has no unicorn.unicorn_py3 module (vtlab needs {REQUIRED})"
    missing = [n for n in _MODULE_NAMES if not hasattr(module, n)]
    if not missing:
        lib = module.uclib
        missing += [f"uclib.{n}" for n in _C_FUNCTIONS if not hasattr(lib, n)]
        missing += [f"Uc.{n}" for n in _UC_METHODS if not hasattr(module.Uc, n)]
        # Uc._uch is set per engine in Uc.__init__: look for it in the source rather than
        # build an engine at import time.
        init = getattr(module.Uc.__init__, "__code__", None)
        if init is not None and "_uch" not in init.co_names:
            missing.append("Uc._uch")
    if missing:
        return f"its private ctypes layer lacks {', '.join(missing)}"
    if _version_tuple(version) < MINIMUM:
        return "it predates the fixes vtlab relies on"
    return None


def check_binding() -> None:
    """Raise ImportError, naming the version needed, unless the binding is usable."""
    problem = binding_problem()
    if problem is not None:
        raise ImportError(
            f"vtlab needs the Unicorn Python binding {REQUIRED}, but unicorn "
            f"{unicorn.__version__} is installed and {problem}.  "
            f"Install a suitable one with:  pip install '{REQUIRED}'")
