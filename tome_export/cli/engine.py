"""``tome-export engine DIR``: finish a build on the machine that runs it, whatever its target.

The manifest names the target, and the target's registration its finishing step (``Target.finish``): TensorRT
builds get their engine built (:mod:`tome_export.targets.tensorrt.handoff`), ``aoti-cuda`` builds their package
compiled (:mod:`tome_export.targets.aoti.finish`); each is validated on that machine's GPU and recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import Command, Parser

EXAMPLES = """examples:
  tome-export --model vit_b16 --r 16 --target tensorrt --output vit_b16-trt     # on the build machine
  tome-export engine vit_b16-trt                                                # on the GPU machine, after copying
  tome-export engine vit_b16-trt --validate-only     # a TensorRT-RTX engine compiled on a CPU, now on its GPU
  tome-export --model vit_b16 --r 16 --target aoti-cuda --output vit_b16-aoti  # without a GPU: the exported program
  tome-export engine vit_b16-aoti                    # on the GPU machine: compile model.pt2, validate, record

TensorRT builds: builds model.engine from the directory's model.onnx with the TensorRT Python API and the settings
the build recorded (optimization profile, builder optimization level, compute capabilities, timing cache), runs it
against model.onnx in ONNX Runtime on the bundled photos with the build's thresholds. Without a CUDA GPU
(TensorRT-RTX builds on the CPU) the engine is recorded as NOT validated; run --validate-only on the GPU machine.

aoti-cuda builds: compiles exported_program.pt2 with AOTInductor into model.pt2 for this GPU and runs it against
the same program run eagerly by PyTorch on the bundled photos with the build's thresholds; needs torch with CUDA
and Triton (not timm or ONNX).

Either way the manifest records the file, its sha256, the library versions, the GPU and the validation
(tome_export.runtime.load then accepts it). Exit 1: the result does not match (nothing is written); exit 2: the
directory has nothing to finish, a checksum does not match, or the library or the GPU is missing.
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tome-export engine", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Finish a build directory on the machine that will run it: build the TensorRT engine of a "
               "--target tensorrt or tensorrt-rtx build, or compile the package of a --target aoti-cuda build; "
               "validate it there and record it.")
    p.add_argument("artifact", type=Path,
                   help="a directory written by tome-export --target tensorrt[-rtx] or aoti-cuda")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="build again and replace the file the directory holds")
    mode.add_argument("--validate-only", action="store_true",
                      help="validate the recorded engine or package on this GPU and record the result; build nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from ..targets import finish_artifact

    def log(message: str) -> None:
        if not args.quiet:
            print(f"tome-export: {message}", file=sys.stderr, flush=True)

    result = finish_artifact(args.artifact, force=args.force, validate_only=args.validate_only, log=log)
    validation = result.validation
    print(f"wrote {result.directory / result.file} ({result.summary})")
    if result.validated:
        print(f"  validation on {result.device}: min cosine {validation['min_cosine']:.6f}, top-1 agreement "
              f"{validation['top1_agreement']:.3f} on {validation['images']} photos against "
              f"{validation.get('against', 'the ONNX')}")
    else:
        print(f"tome-export: warning: {result.file} is built and checksummed but NOT validated "
              f"({validation['reason']}): validate it on the GPU that runs it with `tome-export engine "
              f"{result.directory} --validate-only` there", file=sys.stderr)
    return 0


COMMAND = Command("engine", run, "finish a build on the machine that runs it: TensorRT engine or AOTInductor CUDA "
                  "package, validated there")
