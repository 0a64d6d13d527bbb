"""Target ``tensorrt``: a strongly typed TensorRT recipe: precision-in-graph ONNX, ``build_engine.sh``, and the
engine itself where TensorRT and a GPU are present.

TensorRT 11 removed the FP16/INT8 builder flags and int8 calibrators: fp16/bf16 are Casts in the graph and
int8/fp8 are explicit Q/DQ pairs (see :mod:`.precision`, :mod:`.qdq`). ToMe's matching path and merge arithmetic
stay float32 in every precision. The default merge lowering is ``onehot`` (no reducing ScatterElements, which
only TensorRT's plugin library implements). :func:`.compat.tensorrt_problems` checks every graph statically.
"""

from __future__ import annotations

from .. import Target, register
from .build import OPTIONS, PRECISIONS, RECIPE_SCHEMA, build, check_options
from .compat import tensorrt_problems
from .engine import TENSORRT

TARGET = register(Target(
    name="tensorrt",
    description="TensorRT (strongly typed): precision-in-graph ONNX + build_engine.sh (trtexec); "
                "the engine too where TensorRT and a GPU are present",
    precisions=PRECISIONS,
    default_merge_impl="onehot",
    build=lambda ctx: build(ctx, TENSORRT),
    recipe_schema=RECIPE_SCHEMA,
    options=OPTIONS,
    check=lambda opts, recipe: check_options(opts, recipe, TENSORRT),
))

__all__ = ["TARGET", "tensorrt_problems"]
