"""Errors a user can fix (exit 2), failed validations (exit 1); anything else is a bug (exit 3)."""

from __future__ import annotations

from typing import Any, Dict, Optional

# Top-level modules of the ``build`` extra: the base install (the runtime) does not have them.
BUILD_STACK = frozenset({"torch", "timm", "torchvision", "onnx", "onnxscript", "yaml", "tqdm", "safetensors",
                         "ml_dtypes", "huggingface_hub"})


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do."""


class ValidationError(Exception):
    """A built artifact does not compute what PyTorch computes (beyond the recipe's threshold).

    ``report``: the figures measured, the thresholds applied and which were missed (for ``--json`` and
    ``--keep-failed``); ``kept``: where the failed build was kept, if it was."""

    def __init__(self, message: str, report: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.report: Dict[str, Any] = dict(report or {})
        self.kept: Optional[str] = None


class UnvalidatedEngineWarning(UserWarning):
    """A recorded engine is loaded although it was never run against its ONNX (only the ONNX was validated)."""


def build_stack_missing(module: str, what: str = "this command") -> str:
    """What to say when ``what`` needs a build-stack ``module`` that this (runtime-only) install lacks."""
    return (f"{what} needs the build stack ({module!r} is not installed; this environment has the tome-export "
            f"runtime only): pip install 'tome-export[build]'")


EXIT_CHECK_FAILED = 1  # a built artifact or a checked file does not verify
EXIT_USER_ERROR = 2  # bad input, a missing prerequisite, or the operating system refused (space, permission)
EXIT_INTERNAL_ERROR = 3  # a bug: the traceback is printed for the report

# What to do about the operating-system errors a user can fix, by errno name.
_OS_HINTS = {
    "ENOSPC": "free some space or write elsewhere",
    "EDQUOT": "free some space or write elsewhere",
    "EFBIG": "the file system or a size limit (ulimit -f) refused the file: write elsewhere or lift the limit",
    "EACCES": "choose a place you may write to",
    "EPERM": "choose a place you may write to",
    "EROFS": "choose a writable place",
    "ENAMETOOLONG": "choose a shorter name",
    "ENOENT": "check the path",
    "ENOTDIR": "check the path",
    "EISDIR": "pass a file, not a directory",
    "EMFILE": "raise the open-file limit (ulimit -n)",
}


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    where = f" ({exc.filename})" if exc.filename else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}{where}: {_OS_HINTS.get(name, 'check the path and the disk')}"
