"""The ``tome-export`` command: a thin shell over :mod:`tome_export.build` and friends.

Bad input -> one line on stderr and exit 2; a failed validation -> one line and exit 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .errors import UserError, ValidationError

EXAMPLES = """examples:
  tome-export --model vit_b16 --r 16 --target onnx --weights random
  tome-export --model deit_s --r 16:-1 --dynamic-batch --output out/deit_s
  tome-export --model vit_t16 --r 8,8,8,8,8,8,8,8,8,8,8,8 --merge-impl onehot
  tome-export --model vit_b16 --checkpoint vit_b16.safetensors --batch 8
  tome-export --model hf:google/vit-base-patch16-224 --r 16 --target openvino --precision int8
  tome-export --model ./my-finetuned-vit --r 8          # a save_pretrained directory (transformers)
  tome-export --list-models

--r takes an int (same r in every block), r:inflect (r varying linearly over the blocks,
inflect in [-1, 1], -1 merges more early) or one int per block. r is capped per block at
(tokens - protected) // 2, as in the ToMe reference; the manifest records what ran.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage block)
        raise UserError(f"{message} (see {self.prog} --help)")


def _export_parser() -> argparse.ArgumentParser:
    from .backends import TARGETS

    p = _Parser(
        prog="tome-export",
        description="Export a Token Merging (ToMe) ViT as a static-shape graph for a deployment backend, "
        "validated against PyTorch. Subcommands: " + ", ".join(sorted(SUBCOMMANDS)) + ".",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="alias (vit_b16, deit_s, tv_vit_b16, ...), a timm or torchvision ViT name, "
                   "hf:<repo id> (transformers, hub or its cache) or a save_pretrained directory")
    p.add_argument("--r", default="16", help="tokens merged per block: 16 | 16:-1 | 8,8,... (default 16)")
    p.add_argument("--target", help=f"one of {', '.join(sorted(TARGETS))} (default onnx)")
    p.add_argument("--precision", help="fp32 | fp16 | bf16 | int8 ... as the target supports (default fp32)")
    p.add_argument("--recipe", type=Path, help="a recipe YAML file (default recipes/<target>-<precision>.yaml)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", nargs="?", const=True, default=False, metavar="MIN:OPT:MAX",
                       help="dynamic batch dimension; TensorRT targets also take their optimization profile, "
                       "e.g. --dynamic-batch 1:8:64 (default: the recipe's)")
    p.add_argument("--opset", type=int, help="ONNX opset, >= 18 (default: the recipe's, 18)")
    p.add_argument("--output", "-o", type=Path, help="output directory (default tome-out/<model>-r<r>-<target>-<precision>)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                         help="pretrained (timm / transformers hub, torchvision download, or their caches) or "
                         "seeded random (default pretrained)")
    weights.add_argument("--checkpoint", type=Path, help="a timm or torchvision state_dict (.pth or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    p.add_argument("--merge-impl", default="auto", choices=["auto", "gather", "onehot"],
                   help="merge lowering: gather (TopK/Gather/ScatterElements) or onehot (matmul); auto picks per target")
    p.add_argument("--img-size", type=int, help="input image side in pixels (default: the model's)")
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    p.add_argument("--trace-source", action="store_true",
                   help="add a 'source' output (which patches each final token holds; see `tome-export visualize`)")
    p.add_argument("--force", action="store_true", help="replace an output directory holding another model's build")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    trt = p.add_argument_group("TensorRT targets")
    trt.add_argument("--require-engine", action="store_true",
                     help="fail unless the engine is built here (TensorRT needs its Python package and a GPU; "
                     "TensorRT-RTX builds on the CPU); without it a missing engine is left to build_engine.sh")
    trt.add_argument("--scatter-plugin", action="store_true",
                     help="let --merge-impl gather use TensorRT's ScatterElements plugin (not TensorRT-RTX)")
    p.add_argument("--calib-data", type=Path, metavar="DIR",
                   help="folder of representative images for int8/fp8 calibration (onnxruntime, openvino, "
                   "tensorrt; default: the bundled photos)")
    p.add_argument("--list-models", action="store_true", help="print the model aliases and supported families")
    return p


def _list_models() -> int:
    from .models import FAMILIES, list_models, verified_families
    from .models.paper import PAPER_CHECKPOINTS, SOURCE, describe

    print("aliases (vit_t16 ... vit_l16_384 pin the AugReg weights the ToMe paper used, augreg_in21k_ft_in1k; a bare")
    print("timm name follows timm's default tag, e.g. vit_base_patch16_224 -> augreg2_in21k_ft_in1k):")
    for alias, source, name in list_models():
        print(f"  {alias:18s} {source:12s} {name}")
    print("families:")
    for family in FAMILIES:
        print(f"  {family.FAMILY}: {family.DESCRIPTION}")
    print("verified (tests: see README 'Supported models'):")
    for source, family, names, checked in verified_families():
        print(f"  [{source}] {family}: {names}\n      checked: {checked}")
    print(f"the ToMe paper's checkpoints (ImageNet-1k top-1 as published in {SOURCE};")
    print("benchmarks/paper_imagenet.yaml measures them with --data IMAGENET_VAL):")
    for entry in PAPER_CHECKPOINTS:
        print(f"  {describe(entry)}")
    print("any timm model name of a supported family, torchvision builder[.WEIGHTS] names, hf:<repo id> and "
          "save_pretrained directories also work")
    return 0


class _Progress:
    """A tqdm line that shows the current step and the elapsed time."""

    def __init__(self, steps: int, quiet: bool) -> None:
        from tqdm import tqdm

        # Only on a terminal: in logs and pipes stderr stays clean for the one-line errors.
        quiet = quiet or not sys.stderr.isatty()
        self.bar = tqdm(total=steps, bar_format="{desc} [{elapsed}]", disable=quiet, file=sys.stderr, leave=False)
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if message.startswith("warning:"):
            self.bar.write(message, file=sys.stderr)
            return
        self.bar.set_description_str(message)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _export(argv: Sequence[str]) -> int:
    from .backends.common import summary_line as merge_summary
    from .pipeline import BuildOptions, build, prepare
    from .schedule import parse_r_text

    args = _export_parser().parse_args(argv)
    if args.list_models:
        return _list_models()
    if not args.model:
        raise UserError("--model is required (e.g. --model vit_b16; see --list-models)")
    extra = {"dynamic_batch": args.dynamic_batch if isinstance(args.dynamic_batch, str) else None,
             "require_engine": args.require_engine or None, "scatter_plugin": args.scatter_plugin or None,
             "calib_data": str(args.calib_data) if args.calib_data else None}
    opts = BuildOptions(
        model=args.model, r=parse_r_text(args.r), target=args.target, precision=args.precision,
        batch=args.batch, dynamic_batch=bool(args.dynamic_batch), opset=args.opset, output=args.output,
        weights=args.weights, checkpoint=args.checkpoint, seed=args.seed, merge_impl=args.merge_impl,
        prop_attn=not args.no_prop_attn, img_size=args.img_size, force=args.force, recipe=args.recipe,
        extra={k: v for k, v in extra.items() if v is not None},
        trace_source=args.trace_source,
    )
    prepare(opts)  # cheap checks first, before any progress display
    progress = _Progress(4, args.quiet)
    try:
        result = build(opts, log=progress)
    finally:
        progress.close()
    m = result.manifest
    v = m["validation"]
    print(f"wrote {result.path}")
    print(f"  model      {m['model']['alias']} ({m['model']['source']} {m['model']['name']}, weights {m['model']['weights']})")
    print(f"  r          {m['r_schedule']}{'  (capped)' if m['r_capped'] else ''}")
    print(f"  tokens     {m['num_tokens']} -> {m['tokens_per_block']}")
    print(f"  GMACs      {m['flops']['gmacs']} vs {m['flops']['gmacs_r0']} at r=0 ({m['flops']['ratio']}x fewer)")
    print(f"  validation {v['backend']}: max |diff| {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.5f}, top-1 agreement "
          f"{v['top1_agreement']:.3f} on {v['images']} photos")
    if "precision_ran" in v:
        print(f"  ran        {v['precision_ran']}")
    merges = merge_summary(m.get("merge_decisions", {}))
    if merges:
        print(f"  merges     {merges}")
    for note in m.get("notes", []):
        print(f"  note       {note}")
    return 0


VISUALIZE_EXAMPLES = """examples:
  tome-export visualize astronaut --model vit_b16 --r 16 -o astronaut.png
  tome-export visualize photo.jpg --model deit_s --r 16 --blocks 1,4,8,12 -o merges.png
  tome-export visualize chelsea --artifact tome-out/vit_b16-r16-onnx-fp32 -o deployed.png

IMAGE is an image file or a photo bundled with scikit-image (astronaut, chelsea, coffee, rocket,
motorcycle_left, ...). Each colour is one final token: its patches filled with their mean colour and
outlined in the token's colour. --artifact runs a build made with --trace-source in ONNX Runtime.
"""


def _visualize(argv: Sequence[str]) -> int:
    from . import visualize as vis
    from .preprocess import open_image

    p = _Parser(prog="tome-export visualize", description="Picture which patches ToMe merged into each token.",
                epilog=VISUALIZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file or bundled photo name")
    p.add_argument("--output", "-o", type=Path, required=True, help="picture to write (.png, .jpg)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="alias or timm name: source tracking in PyTorch")
    source.add_argument("--artifact", type=Path, help="a build made with --trace-source: its graph in ONNX Runtime")
    p.add_argument("--r", default="16", help="tokens merged per block: 16 | 16:-1 | 8,8,... (default 16)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], default="pretrained")
    weights.add_argument("--checkpoint", type=Path, help="a timm state_dict (.pth or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    p.add_argument("--img-size", type=int, help="input image side in pixels (default: the model's)")
    p.add_argument("--merge-impl", default="gather", choices=["gather", "onehot"])
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    p.add_argument("--blocks", help="a grid of merge states after these blocks, e.g. 1,6,12 (--model only)")
    p.add_argument("--fill", default="mean", choices=vis.FILLS, help="group fill: mean colour or palette (default mean)")
    p.add_argument("--scale", type=int, default=2, help="pixels per input pixel (default 2)")
    args = p.parse_args(argv)
    if not 1 <= args.scale <= 8:
        raise UserError(f"--scale must be between 1 and 8, got {args.scale}")
    vis.check_output_file(args.output)
    image = open_image(vis.find_image(args.image))
    if args.artifact is not None:
        if args.blocks:
            raise UserError("--blocks needs --model: a built graph outputs only the final merge state")
        picture, patch, state = vis.artifact_merge_state(args.artifact, image)
        states = [state]
    else:
        from .models import create_model, model_info, patch as tome_patch
        from .schedule import parse_r_text, resolve_schedule

        r = parse_r_text(args.r)
        if args.img_size is not None and args.img_size < 16:
            raise UserError(f"--img-size must be a positive image side in pixels, got {args.img_size}")
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        model, _ = create_model(args.model, weights=args.weights, checkpoint=args.checkpoint, seed=args.seed, **kwargs)
        info = model_info(model)
        schedule = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
        blocks = vis.parse_blocks(args.blocks, info.num_blocks) if args.blocks else None
        if schedule.capped:
            print(f"tome-export: warning: {schedule.cap_message()}", file=sys.stderr)
        tome_patch(model, r, merge_impl=args.merge_impl, prop_attn=not args.no_prop_attn)
        picture, patch, states = vis.model_merge_states(model, image, blocks)
    vis.save_picture(vis.picture(picture, patch, states, fill=args.fill, scale=args.scale), args.output)
    print(f"wrote {args.output}: " + "; ".join(f"{s.title}, {s.num_groups} groups" for s in states))
    return 0


def _inspect(argv: Sequence[str]) -> int:
    from .inspection import format_report, inspect_path
    from .manifest import dumps

    p = _Parser(prog="tome-export inspect",
                description="Show what a build directory (or a bare model.onnx) holds: schedule, tokens, FLOPs, "
                "op histogram, TensorRT compatibility, validation, sizes and checksums. Exit 1 when a checksum "
                "does not match.")
    p.add_argument("path", type=Path, help="a directory written by tome-export, or a .onnx file")
    p.add_argument("--json", action="store_true", help="the full report as JSON")
    args = p.parse_args(argv)
    report = inspect_path(args.path)
    print(dumps(report) if args.json else format_report(report))
    checks = report.get("checksums")
    if checks is not None and not checks["ok"]:
        bad = [rel for rel, f in checks["files"].items() if f["status"] != "ok"]
        what = ", ".join(f"{rel} {checks['files'][rel]['status']}" for rel in bad) or "manifest.json edited"
        print(f"tome-export: {args.path} does not verify ({what}): rebuild it", file=sys.stderr)
        return 1
    return 0


SUBCOMMANDS: Dict[str, Callable[[Sequence[str]], int]] = {"visualize": _visualize, "inspect": _inspect}

BENCH_EXAMPLES = """examples:
  tome-export bench --config benchmarks/vit_b16_cpu.yaml --out benchmarks/results/vit_b16_cpu
  tome-export bench --config benchmarks/digits_accuracy.yaml
  tome-export bench --config my.yaml --weights pretrained --data imagenet/val   # top-1/top-5 accuracy

A re-run into the same --out resumes: measured cells are kept, the rest are measured (--force: all again).
--data is an ImageFolder: one folder per class; sorted folder names give the class indices (ImageNet's
n01440764 ... order), or folders named 0, 1, ... give them directly.
"""


def _bench(argv: Sequence[str]) -> int:
    from .bench.config import load_config
    from .bench.harness import run_bench

    p = _Parser(prog="tome-export bench", epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Benchmark ToMe x precision x backend x batch size; writes results, report.md and plots.")
    p.add_argument("--config", type=Path, required=True, help="benchmark YAML (see benchmarks/)")
    p.add_argument("--out", "-o", type=Path, help="output directory (default bench-out/<config name>)")
    p.add_argument("--data", type=Path, help="ImageFolder of labelled images for top-1/top-5 accuracy")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], help="override the config's weights")
    weights.add_argument("--checkpoint", type=Path, help="a timm state_dict for the config's (single) model")
    p.add_argument("--cache", type=Path, help="where built artifacts are kept (default OUT/artifacts)")
    p.add_argument("--force", action="store_true", help="measure every cell again instead of resuming")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    config = load_config(args.config).with_weights(args.weights, args.checkpoint)
    out = args.out if args.out is not None else Path("bench-out") / config.name
    try:
        # a progress bar on a terminal; one line per step in logs (long runs), nothing with --quiet
        log = (lambda msg: None) if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
        result = run_bench(config, out, data=args.data, force=args.force, cache=args.cache, progress=not args.quiet,
                           log=log)
    except KeyboardInterrupt:
        print(f"tome-export bench: interrupted; finished groups are saved in {out} (re-run to resume)", file=sys.stderr)
        return 130
    print(f"wrote {result.out_dir}/report.md, results.json, results.csv and plots/")
    print(f"  cells: {result.measured} measured, {result.resumed} resumed, {result.skipped} skipped, {result.failed} failed")
    return 0


SUBCOMMANDS["bench"] = _bench


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        return _export(argv)
    except UserError as exc:
        print(f"tome-export: error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"tome-export: validation failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tome-export: interrupted; nothing was written", file=sys.stderr)
        return 130


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: nothing half-written stays


def run() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
