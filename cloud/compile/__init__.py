"""river -> ONNX compiler, parity gate and user-model validation (see docs/compile.md).

Public API::

    compiled = compile_pipeline(model, features, name="press-7")     # CompiledModel
    report = check_parity(model, compiled, recent_frames)              # ParityReport (.passed)
    checked = validate_user_model(onnx_bytes, features, "classifier")  # ValidationReport (.model)
"""

from cloud.compile.errors import CompileError, UnsupportedModelError, UserModelError
from cloud.compile.model import (
    CLASSIFIER_OUTPUTS,
    INPUT_NAME,
    REGRESSOR_OUTPUTS,
    CompiledModel,
    Kind,
    ParityReport,
    ValidationReport,
)
from cloud.compile.parity import DEFAULT_ATOL, check_parity
from cloud.compile.river_compiler import DEFAULT_OPSET, SUPPORTED, compile_pipeline
from cloud.compile.user_model import validate_user_model

__all__ = [
    "CLASSIFIER_OUTPUTS",
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "REGRESSOR_OUTPUTS",
    "SUPPORTED",
    "CompileError",
    "CompiledModel",
    "Kind",
    "ParityReport",
    "UnsupportedModelError",
    "UserModelError",
    "ValidationReport",
    "check_parity",
    "compile_pipeline",
    "validate_user_model",
]
