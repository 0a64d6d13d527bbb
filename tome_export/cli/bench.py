"""``tome-export bench``: ToMe x precision x backend x batch size, from a YAML config (:mod:`tome_export.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..bench.executors import CLUSTER_HELP
from .common import Command, Parser

BENCH_EXAMPLES = """examples:
  tome-export bench --config benchmarks/vit_b16_cpu.yaml --out benchmarks/results/vit_b16_cpu
  tome-export bench --config benchmarks/digits_accuracy.yaml
  tome-export bench --config my.yaml --weights pretrained --data imagenet/val   # top-1/top-5 accuracy
  tome-export bench --config benchmarks/core_onnxruntime.yaml --cluster ray://head:10001   # on a Ray cluster

A re-run into the same --out resumes: measured cells are kept, the rest are measured (--force: all again).
With --cluster, each timing group (the variants of one model, backend, batch and thread count) runs on a node
that it has to itself, builds its artifacts there (under --cache, on that node's disk) and sends back its records.
--data is an ImageFolder: one folder per class; sorted folder names give the class indices (ImageNet's
n01440764 ... order), or folders named 0, 1, ... give them directly.
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tome-export bench", epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Benchmark ToMe x precision x backend x batch size; writes results, report.md and plots.")
    p.add_argument("--config", type=Path, required=True, help="benchmark YAML (see benchmarks/)")
    p.add_argument("--out", "-o", type=Path, help="output directory (default bench-out/<config name>)")
    p.add_argument("--data", type=Path, help="ImageFolder of labelled images for top-1/top-5 accuracy")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], help="override the config's weights")
    weights.add_argument("--checkpoint", type=Path, help="a timm state_dict for the config's (single) model")
    p.add_argument("--cache", type=Path, help="where built artifacts are kept (default OUT/artifacts)")
    p.add_argument("--force", action="store_true", help="measure every cell again instead of resuming")
    p.add_argument("--allow-large", action="store_true", help="run a matrix over the cell limit, or batches whose "
                   "memory estimate exceeds half of this machine's memory")
    p.add_argument("--cluster", metavar="ADDRESS", help=CLUSTER_HELP + " (needs tome-export[cluster])")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from ..bench.config import load_config
    from ..bench.harness import run_bench

    config = load_config(args.config).with_weights(args.weights, args.checkpoint)
    out = args.out if args.out is not None else Path("bench-out") / config.name
    try:
        # a progress bar on a terminal; one line per step in logs (long runs), nothing with --quiet
        log = (lambda msg: None) if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
        result = run_bench(config, out, data=args.data, force=args.force, cache=args.cache, progress=not args.quiet,
                           log=log, allow_large=args.allow_large, cluster=args.cluster)
    except KeyboardInterrupt:
        print(f"tome-export bench: interrupted; finished groups are saved in {out} (re-run to resume)", file=sys.stderr)
        return 130
    print(f"wrote {result.out_dir}/report.md, results.json, results.csv and plots/")
    print(f"  cells: {result.measured} measured, {result.resumed} resumed, {result.skipped} skipped, {result.failed} failed")
    return 0


COMMAND = Command("bench", run, "benchmark ToMe x precision x backend x batch size from a YAML config")
