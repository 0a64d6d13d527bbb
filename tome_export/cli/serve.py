"""``tome-export serve DIR``: a serving-system model repository entry for a finished build (Triton)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .common import Command, Parser

if TYPE_CHECKING:
    from ..serve import ServeResult

EXAMPLES = """examples:
  tome-export serve tome-out/vit_b16-r16-openvino-int8
  tome-export serve tome-out/vit_t16-r8-onnxruntime-fp32 --variant native -o /models --max-batch-size 16
  tome-export --model vit_b16 --r 16 --target openvino --precision int8 --serve triton   # build, then this

Writes REPO/NAME/config.pbtxt, REPO/NAME/1/ (the model), README.md and SHA256SUMS. REPO defaults to
model_repository/ beside the build, NAME to the build directory's name. --variant python (default) serves
the artifact through tome_export.runtime in Triton's Python backend, exactly as validated; native hands the
graph to Triton's onnxruntime, openvino or tensorrt backend (README.md lists what those cannot express).
"""


def print_served(result: "ServeResult", first: str = "  served    ") -> None:
    """What was written and how to start the server on it; the plan's caveats go to stderr as warnings."""
    plan = result.plan
    batching = f"max_batch_size {plan.batching.max_batch_size}" + (", dynamic batching" if plan.batching.dynamic else "")
    print(f"{first} {result.model_dir} (Triton {plan.backend} backend; {batching})")
    print(f"  run        tritonserver --model-repository {result.repository}")
    for note in plan.notes:
        print(f"tome-export: warning: {note}", file=sys.stderr)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The build command's serving flags: the same step as ``tome-export serve`` on the finished build."""
    from ..serve import FORMATS
    from ..serve.triton import VARIANTS

    group = p.add_argument_group("serving (the same step as `tome-export serve` on the finished build)")
    group.add_argument("--serve", choices=FORMATS, help="also write a model repository entry for this build")
    group.add_argument("--serve-variant", choices=VARIANTS, default="python",
                       help="python: Triton's Python backend runs the artifact through tome_export.runtime "
                       "(default); native: Triton's onnxruntime / openvino / tensorrt backend")
    group.add_argument("--serve-repository", type=Path, metavar="REPO",
                       help="model repository (default: model_repository/ beside the build directory)")


def parser() -> argparse.ArgumentParser:
    from ..serve import FORMATS
    from ..serve.triton import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US, VARIANTS

    p = Parser(prog="tome-export serve", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Write a serving-system model repository entry for a build directory.")
    p.add_argument("artifact", type=Path, help="a directory written by tome-export")
    p.add_argument("--format", default="triton", choices=FORMATS, help="serving system (default triton)")
    p.add_argument("--variant", default="python", choices=VARIANTS, help="python (default) or native backend")
    p.add_argument("--output", "-o", type=Path, metavar="REPO",
                   help="model repository (default: model_repository/ beside the artifact)")
    p.add_argument("--name", help="model name in the repository (default: the artifact directory's name)")
    p.add_argument("--max-batch-size", type=int, help=f"largest batch Triton forms (default: the TensorRT "
                   f"profile's max, else {DEFAULT_MAX_BATCH}); dynamic-batch builds only")
    p.add_argument("--queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"how long dynamic batching waits to fill a batch (default {DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--threads", type=int, help="CPU threads per model instance (default: the backend's)")
    p.add_argument("--force", action="store_true", help="replace a model of the same name in the repository")
    return p


def run(argv: Sequence[str]) -> int:
    from ..serve import serve_artifact
    from ..serve.triton import TritonOptions

    args = parser().parse_args(argv)
    options = TritonOptions(variant=args.variant, name=args.name, max_batch_size=args.max_batch_size,
                            queue_delay_us=args.queue_delay_us, threads=args.threads)
    print_served(serve_artifact(args.artifact, args.format, args.output, options, args.force), first="wrote")
    return 0


COMMAND = Command("serve", run, "write a Triton model repository entry for a finished build")
