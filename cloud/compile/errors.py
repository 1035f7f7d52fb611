"""Errors raised by the compiler, the parity gate and user-model validation."""

from __future__ import annotations

__all__ = ["CompileError", "UnsupportedModelError", "UserModelError"]


class CompileError(ValueError):
    """A river model cannot be compiled as it stands (e.g. it has not learned anything yet, or it
    uses a feature that is not in the manifest's feature list)."""


class UnsupportedModelError(CompileError):
    """A pipeline step, estimator or configuration the compiler cannot reproduce exactly.

    The message names the step and lists what is supported; the registry records the version as
    one that cannot ship.
    """


class UserModelError(ValueError):
    """A user-supplied ONNX model was refused (not ONNX, wrong inputs/outputs, NaN output, ...)."""
