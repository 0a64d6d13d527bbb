"""Errors a user can fix (exit 2), failed validations (exit 1); anything else is a bug (exit 3)."""

from __future__ import annotations

# Top-level modules of the ``build`` extra: the base install (the runtime) does not have them.
BUILD_STACK = frozenset({"torch", "timm", "torchvision", "onnx", "onnxscript", "yaml", "tqdm", "safetensors",
                         "ml_dtypes", "huggingface_hub"})


class UserError(Exception):
    """Bad input or a missing prerequisite; the message says what to do."""


class ValidationError(Exception):
    """A built artifact does not compute what PyTorch computes (beyond the recipe's threshold)."""


def build_stack_missing(module: str, what: str = "this command") -> str:
    """What to say when ``what`` needs a build-stack ``module`` that this (runtime-only) install lacks."""
    return (f"{what} needs the build stack ({module!r} is not installed; this environment has the tome-export "
            f"runtime only): pip install 'tome-export[build]'")
