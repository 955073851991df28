"""Errors a learner can cause, each phrased in the SDM's terms.

Every error derives from :class:`VtlabError`, so a notebook can catch them all with one
``except`` and still show the precise message.  None of them leaves the virtual machine
unusable: the guest memory, registers, VMCS and trace stay inspectable afterwards.
"""
from __future__ import annotations


class VtlabError(Exception):
    """Base class of every error vtlab raises on purpose."""


class AssemblyError(VtlabError):
    """The guest source could not be assembled.

    ``line`` is the 1-based line number in the source (``None`` if it could not be
    pinned down) and ``text`` that line's text.
    """

    def __init__(self, message: str, line: int | None = None, text: str | None = None):
        self.line, self.text, self.reason = line, text, message
        where = f"line {line}: {text.strip()!r}: " if line is not None else ""
        super().__init__(f"assembly error: {where}{message}")


class GuestFault(VtlabError):
    """The guest raised an x86 exception that nobody handled (vector and error code)."""

    def __init__(self, vector: int, error_code: int | None, rip: int, message: str = ""):
        from .arch.exceptions import EXCEPTION_INFO, Vector

        self.vector, self.error_code, self.rip = vector, error_code, rip
        try:
            info = EXCEPTION_INFO[Vector(vector)]
            name = f"{info.mnemonic} ({info.name})"
        except (ValueError, KeyError):
            name = f"interrupt {vector}"
        code = "" if error_code is None else f", error code {error_code:#x}"
        extra = f": {message}" if message else ""
        super().__init__(f"{name} at RIP {rip:#x}{code}{extra}")


class BudgetExceeded(VtlabError):
    """A runaway guest: the instruction or exit budget ran out before it stopped."""


class VmcsError(VtlabError):
    """A VMREAD/VMWRITE through the convenience API failed (carries the VM-instruction error)."""

    def __init__(self, message: str, error: int | None = None):
        self.error = error
        super().__init__(message)


class VmxFailure(VtlabError):
    """A VMX instruction failed (VMfailInvalid / VMfailValid) or faulted (#UD, #GP)."""

    def __init__(self, outcome):  # outcome: vtlab.vmx.VmxOutcome
        self.outcome = outcome
        super().__init__(str(outcome))


class VmEntryFailure(VtlabError):
    """VM entry failed on a guest-state check (exit reason 33 with bit 31 set)."""


class HandlerError(VtlabError):
    """A VM-exit handler (usually the learner's) raised; the VM is stopped, not lost."""


class TripleFault(VtlabError):
    """The guest triple-faulted: an exception could not be delivered, even as #DF."""
