"""``tome-export engine DIR``: build, validate and record a TensorRT build's engine on the GPU machine
(:mod:`tome_export.targets.tensorrt.handoff`)."""

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

Builds model.engine from the directory's model.onnx with the TensorRT Python API and the settings the build
recorded (optimization profile, builder optimization level, compute capabilities, timing cache), runs it against
model.onnx in ONNX Runtime on the bundled photos with the build's thresholds, and records the engine, its
sha256, the library, the GPU and the validation in manifest.json (tome_export.runtime.load then accepts it).
Without a CUDA GPU (TensorRT-RTX builds on the CPU) the engine is recorded as NOT validated; run
--validate-only on the GPU machine. Exit 1: the engine does not match the ONNX (nothing is written);
exit 2: not a TensorRT build, a checksum does not match, or the library is missing.
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tome-export engine", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Build, validate and record the TensorRT engine of a --target tensorrt or tensorrt-rtx "
               "build directory, on the machine that will run it.")
    p.add_argument("artifact", type=Path, help="a directory written by tome-export --target tensorrt[-rtx]")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="build again and replace the engine the directory holds")
    mode.add_argument("--validate-only", action="store_true",
                      help="validate the recorded engine on this GPU and record the result; build nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from ..targets.tensorrt.handoff import finish_engine

    def log(message: str) -> None:
        if not args.quiet:
            print(f"tome-export: {message}", file=sys.stderr, flush=True)

    result = finish_engine(args.artifact, force=args.force, validate_only=args.validate_only, log=log)
    engine, validation = result.engine, result.validation
    print(f"wrote {result.directory / engine['file']} ({engine['library']} {engine['library_version']}, "
          f"{engine['bytes'] / 1e6:.1f} MB, {engine['build_seconds']} s; sha256 {engine['sha256'][:16]}...)")
    if result.validated:
        print(f"  validation on {engine['device']['name']}: min cosine {validation['min_cosine']:.6f}, top-1 "
              f"agreement {validation['top1_agreement']:.3f} on {validation['images']} photos against the ONNX")
    else:
        print(f"tome-export: warning: {engine['file']} is built and checksummed but NOT validated "
              f"({validation['reason']}): validate it on the GPU that runs it with `tome-export engine "
              f"{result.directory} --validate-only` there", file=sys.stderr)
    return 0


COMMAND = Command("engine", run, "build, validate and record a TensorRT build's engine on the GPU machine")
