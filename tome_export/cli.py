"""The ``tome-export`` command: a thin shell over :mod:`tome_export.build` and friends.

Bad input -> one line on stderr and exit 2; a failed validation -> one line and exit 1.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--model", help="alias (vit_b16, deit_s, ...) or any timm ViT name")
    p.add_argument("--r", default="16", help="tokens merged per block: 16 | 16:-1 | 8,8,... (default 16)")
    p.add_argument("--target", help=f"one of {', '.join(sorted(TARGETS))} (default onnx)")
    p.add_argument("--precision", help="fp32 | fp16 | bf16 | int8 ... as the target supports (default fp32)")
    p.add_argument("--recipe", type=Path, help="a recipe YAML file (default recipes/<target>-<precision>.yaml)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="dynamic batch dimension")
    p.add_argument("--opset", type=int, help="ONNX opset, >= 18 (default: the recipe's, 18)")
    p.add_argument("--calib-data", type=Path, metavar="DIR",
                   help="folder of representative images for int8 calibration (default: bundled photos, augmented)")
    p.add_argument("--output", "-o", type=Path, help="output directory (default tome-out/<model>-r<r>-<target>-<precision>)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                         help="pretrained (timm hub or its cache) or seeded random (default pretrained)")
    weights.add_argument("--checkpoint", type=Path, help="a timm state_dict (.pth or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    p.add_argument("--merge-impl", default="auto", choices=["auto", "gather", "onehot"],
                   help="merge lowering: gather (TopK/Gather/ScatterElements) or onehot (matmul); auto picks per target")
    p.add_argument("--img-size", type=int, help="input image side in pixels (default: the model's)")
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    p.add_argument("--force", action="store_true", help="replace an output directory holding another model's build")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--list-models", action="store_true", help="print the model aliases and supported families")
    return p


def _list_models() -> int:
    from .models import ALIASES, FAMILIES

    print("aliases:")
    for alias, name in ALIASES.items():
        print(f"  {alias:18s} {name}")
    print("families:")
    for family in FAMILIES:
        print(f"  {family.FAMILY}: {family.DESCRIPTION}")
    print("any timm model name of a supported family also works")
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
    opts = BuildOptions(
        model=args.model, r=parse_r_text(args.r), target=args.target, precision=args.precision,
        batch=args.batch, dynamic_batch=args.dynamic_batch, opset=args.opset, output=args.output,
        weights=args.weights, checkpoint=args.checkpoint, seed=args.seed, merge_impl=args.merge_impl,
        prop_attn=not args.no_prop_attn, img_size=args.img_size, force=args.force, recipe=args.recipe,
        extra={"calib_data": args.calib_data} if args.calib_data else {},
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
    print(f"  model      {m['model']['alias']} ({m['model']['timm_name']}, weights {m['model']['weights']})")
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


SUBCOMMANDS: Dict[str, Callable[[Sequence[str]], int]] = {}


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


def run() -> None:
    sys.exit(main())
