"""``tome-export inspect``: what a build directory or a bare ``model.onnx`` holds (:mod:`tome_export.inspection`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .common import Command, Parser


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tome-export inspect",
               description="Show what a build directory (or a bare model.onnx) holds: schedule, tokens, FLOPs, "
               "op histogram, TensorRT compatibility, validation, sizes and checksums. Exit 1 when a checksum "
               "does not match.")
    p.add_argument("path", type=Path, help="a directory written by tome-export, or a .onnx file")
    p.add_argument("--json", action="store_true", help="the full report as JSON")
    return p


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from ..inspection import checksum_failures, format_report, inspect_path
    from ..manifest import dumps

    report = inspect_path(args.path)
    print(dumps(report) if args.json else format_report(report))
    failures = checksum_failures(report)
    if failures is not None:
        print(f"tome-export: {args.path} does not verify ({failures}): rebuild it", file=sys.stderr)
        return 1
    return 0


COMMAND = Command("inspect", run, "show what a build directory or a model.onnx holds, and verify it")
