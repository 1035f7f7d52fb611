"""A small builder for the ONNX graphs the compiler emits (double precision throughout)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from cloud.compile.model import INPUT_NAME

__all__ = ["GraphBuilder"]

ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 5  # TreeEnsemble (double thresholds and leaf weights) appeared in ai.onnx.ml 5


class GraphBuilder:
    """Accumulates nodes and initializers; names are unique and readable in Netron."""

    def __init__(self, n_features: int) -> None:
        self.n_features = n_features
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.uses_ml = False
        self._names: dict[str, int] = {}
        self.input = INPUT_NAME

    def _unique(self, hint: str) -> str:
        n = self._names.get(hint, 0)
        self._names[hint] = n + 1
        return hint if n == 0 else f"{hint}_{n}"

    def const(self, hint: str, value: npt.ArrayLike, dtype: Any = np.float64) -> str:
        name = self._unique(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self,
        op_type: str,
        *inputs: str,
        hint: str = "",
        domain: str = "",
        n_outputs: int = 1,
        **attrs: Any,
    ) -> str:
        """Add a node; return the name of its first output (extra outputs get throwaway names)."""
        out = self._unique(hint or op_type.lower())
        extra = [self._unique(f"{out}_out{i}") for i in range(1, n_outputs)]
        self.nodes.append(
            helper.make_node(
                op_type,
                list(inputs),
                [out, *extra],
                name=self._unique(f"n_{out}"),
                domain=domain,
                **attrs,
            )
        )
        if domain == ML_DOMAIN:
            self.uses_ml = True
        return out

    def alias(self, src: str, dst: str) -> None:
        """Expose ``src`` under the graph-output name ``dst``."""
        self.nodes.append(helper.make_node("Identity", [src], [dst], name=f"n_{dst}"))

    # small idioms used by every step
    def nan_to_zero(self, x: str) -> str:
        zero = self.const("zero", 0.0)
        return self.op("Where", self.op("IsNaN", x), zero, x, hint="x_filled")

    def reduce(self, op_type: str, x: str, axis: int, keepdims: bool, hint: str = "") -> str:
        axes = self.const("axes", [axis], dtype=np.int64)
        return self.op(op_type, x, axes, keepdims=int(keepdims), hint=hint or op_type.lower())

    def build(
        self,
        name: str,
        outputs: list[tuple[str, int, list[Any]]],
        opset: int,
        metadata: dict[str, str],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(self.input, TensorProto.DOUBLE, ["N", self.n_features])],
            [helper.make_tensor_value_info(n, t, shape) for n, t, shape in outputs],
            initializer=self.initializers,
        )
        imports = [helper.make_opsetid("", opset)]
        if self.uses_ml:
            imports.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
        model = helper.make_model(
            graph, opset_imports=imports, producer_name="edgeloop.compile", producer_version="1"
        )
        # ORT 1.32 reads IR version 10 models (onnx 1.16+); pin it so newer onnx releases do not
        # emit an IR version the gateway's runtime refuses.
        model.ir_version = 10
        helper.set_model_props(model, metadata)
        onnx.checker.check_model(model, full_check=True)
        return model
