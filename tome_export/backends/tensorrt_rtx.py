"""Target ``tensorrt-rtx``: the TensorRT recipe built with TensorRT-RTX, which compiles engines ahead of time on
the CPU (no GPU needed; kernels are specialised for the GPU on first run).

Same graphs as ``--target tensorrt`` (see :mod:`.tensorrt`), with two differences: TensorRT-RTX has no plugins, so
reducing ScatterElements (the ``gather`` merge lowering) is always rejected, and it has no timing cache.
All five precisions parse and build here; at run time fp8 GEMMs need compute capability >= 8.9 (the fp8 recipe
targets 8.9 and 12.0), and NVIDIA documents int8 GEMMs on RTX GPUs as weight-only.
"""

from __future__ import annotations

from . import Target, register
from .tensorrt.build import OPTIONS, PRECISIONS, RECIPE_SCHEMA, build, check_options
from .tensorrt.engine import TENSORRT_RTX

TARGET = register(Target(
    name="tensorrt-rtx",
    description="TensorRT-RTX: precision-in-graph ONNX + a real engine compiled here on the CPU (no GPU needed)",
    precisions=PRECISIONS,
    default_merge_impl="onehot",
    build=lambda ctx: build(ctx, TENSORRT_RTX),
    requires=("tensorrt_rtx",),
    recipe_schema=RECIPE_SCHEMA,
    options=tuple(o for o in OPTIONS if o != "scatter_plugin"),
    check=lambda opts, recipe: check_options(opts, recipe, TENSORRT_RTX),
))
