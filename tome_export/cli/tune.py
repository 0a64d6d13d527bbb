"""``tome-export tune``: the fastest artifact within an accuracy budget, on this machine (:mod:`tome_export.tuning`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..bench.executors import CLUSTER_HELP
from .common import Command, Parser
from .export import task_arguments, task_of

EXAMPLES = """examples:
  tome-export tune --model digits_vit --target openvino --max-accuracy-drop 1.0 --data digits --output out/
  tome-export tune --model vit_b16 --target openvino --batch 8 --min-agreement 0.95 --output tuned/
  tome-export tune --model vit_b16 --target openvino --min-agreement 0.95 --cluster ray://head:10001 --output tuned/
  tome-export tune --model vit_b16 --target onnxruntime --precisions fp32,int8 --max-accuracy-drop 0.5 \\
      --data imagenet/val --max-latency-ms 40 --time-budget 60 --output tuned/
  tome-export tune --model dinov2_s14_reg --task dense --target openvino --min-cosine 0.95 --output tuned-dense/

Budgets: --max-accuracy-drop PTS counts the images of --data (an ImageFolder, or 'digits' for the embedded
digits model) that fp32 r=0 classifies correctly and a candidate does not; --min-agreement A is the top-1
agreement with fp32 r=0 on calibration-style photos (--calib-data, else the bundled ones); --min-cosine C (--task
embed, dense, tokens) is the task's mean feature cosine with fp32 r=0 on those photos (embeddings, patches, or
each image's pooled tokens). The output is a normal
build (runtime.load reads it) with tune.md, tune-pareto.png and a 'tune' section in manifest.json. Exit 0 when
the winner meets the budget, 1 when the budget could not be met (the best that does, or fp32 r=0, is written
and the reason printed), 2 for bad input.
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tome-export tune", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Search r schedules x precisions for the fastest artifact within a quality budget, "
                           "timed on this machine, and write the winner with its tuning report.")
    p.add_argument("--model", required=True, help="as for a build (alias, timm/torchvision name, hf:<repo id>, ...)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                         help="pretrained (default) or seeded random")
    weights.add_argument("--checkpoint", type=Path, help="a timm or torchvision state_dict (.pth or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and of the evaluation images")
    p.add_argument("--target", required=True, help="a build target that runs on this machine (onnxruntime, openvino, ...)")
    p.add_argument("--batch", type=int, default=1, help="static batch size to tune for (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads (default: every CPU)")
    budget = p.add_argument_group("budget (give one)")
    budget.add_argument("--max-accuracy-drop", type=float, metavar="PTS", help="top-1 points that may be lost (needs --data)")
    budget.add_argument("--min-agreement", type=float, metavar="A", help="top-1 agreement with fp32 r=0, in [0, 1]")
    budget.add_argument("--min-cosine", type=float, metavar="C",
                        help="--task embed, dense, tokens: mean feature cosine with fp32 r=0, e.g. 0.99")
    p.add_argument("--data", help="ImageFolder of labelled images, or 'digits' (the embedded digits model's test split)")
    p.add_argument("--precisions", help="comma-separated (default: every precision the target can run here)")
    p.add_argument("--max-latency-ms", type=float, metavar="MS", help="median latency limit per batch")
    p.add_argument("--time-budget", type=float, default=30.0, metavar="MIN", help="minutes for the whole run (default 30)")
    p.add_argument("--eval-images", type=int, default=64, help="images for --min-agreement (default 64)")
    p.add_argument("--max-images", type=int, default=1000, help="at most this many --data images (default 1000)")
    p.add_argument("--calib-data", type=Path, help="photos for int8 calibration and --min-agreement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of the finalists (default 5)")
    p.add_argument("--tie-tolerance", type=float, default=0.03,
                   help="throughputs closer than this fraction are a tie, broken by quality (default 0.03)")
    p.add_argument("--cache", type=Path, help="where candidates are built and kept (default ~/.cache/tome-export/tune)")
    p.add_argument("--output", "-o", type=Path, required=True, help="directory for the winning artifact and report")
    p.add_argument("--force", action="store_true", help="replace an output directory holding another build")
    p.add_argument("--cluster", metavar="ADDRESS", help=CLUSTER_HELP + "; candidates are built on any node, timed "
                   "together on one, and the winner is written here (rebuilt and checked by sha256, or copied from a "
                   "--cache every node shares). Needs tome-export[cluster]")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    task_arguments(p)
    return p


def run(argv: Sequence[str]) -> int:
    from ..tuning import Budget, TimingSettings, TuneRequest, tune
    from ..tuning.request import parse_precisions

    args = parser().parse_args(argv)
    request = TuneRequest(
        model=args.model, target=args.target, output=args.output, data=args.data, weights=args.weights,
        checkpoint=args.checkpoint, seed=args.seed, batch=args.batch, threads=args.threads,
        budget=Budget(args.max_accuracy_drop, args.min_agreement, args.max_latency_ms, args.min_cosine),
        precisions=parse_precisions(args.precisions), time_budget_min=args.time_budget, eval_images=args.eval_images,
        max_images=args.max_images, calib_data=args.calib_data, cache=args.cache, tie_tolerance=args.tie_tolerance,
        timing=TimingSettings(rounds=args.rounds), force=args.force, task=task_of(args))
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"tune: {msg}", file=sys.stderr, flush=True))
    result = tune(request, log=log, cluster=args.cluster)
    s = result.section
    w = s["winner"]
    print(f"wrote {result.path} ({w['candidate']}, r {w['r']}: {w['reason']})")
    print(f"  {s['tome_verdict']}")
    print(f"  report: {result.path / 'tune.md'}; {len(s['candidates'])} candidates in "
          f"{s['elapsed_s'] / 60:.1f} of {s['time_budget_min']:g} minutes")
    if not result.met_budget:
        print(f"tome-export tune: budget not met: {w['reason']}", file=sys.stderr)
        return 1
    return 0


COMMAND = Command("tune", run, "the fastest artifact within an accuracy budget, on this machine")
