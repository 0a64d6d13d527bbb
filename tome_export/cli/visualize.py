"""``tome-export visualize``: picture which patches ToMe merged into each token (:mod:`tome_export.visualize`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .common import Command, Parser

EXAMPLES = """examples:
  tome-export visualize astronaut --model vit_b16 --r 16 -o astronaut.png
  tome-export visualize photo.jpg --model deit_s --r 16 --blocks 1,4,8,12 -o merges.png
  tome-export visualize chelsea --artifact tome-out/vit_b16-r16-onnx-fp32 -o deployed.png

IMAGE is an image file or a photo bundled with tome-export (astronaut, chelsea, coffee, rocket,
motorcycle_left, ...). The picture shows the input as the model sees it, then the merge state after
several blocks, each captioned with its token count. Each colour is one token: its patches filled with
their mean colour and outlined in the token's colour. --artifact runs a build made with --trace-source
through its own runner (its final state only).
"""


def parser() -> argparse.ArgumentParser:
    from ..visualize import FILLS

    p = Parser(prog="tome-export visualize", description="Picture which patches ToMe merged into each token.",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="image file or bundled photo name")
    p.add_argument("--output", "-o", type=Path, required=True, help="picture to write (.png, .jpg)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="alias or model name: source tracking in PyTorch")
    source.add_argument("--artifact", type=Path, help="a build made with --trace-source, run by its own runner")
    p.add_argument("--r", default="16", help="tokens merged per block: 16 | 16:-1 | 8,8,... (default 16)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", choices=["pretrained", "random"], default="pretrained")
    weights.add_argument("--checkpoint", type=Path, help="a state_dict of the model (.pth or .safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    p.add_argument("--img-size", type=int, help="input image side in pixels (default: the model's)")
    p.add_argument("--merge-impl", default="gather", choices=["gather", "onehot"])
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    p.add_argument("--blocks", help="merge states after these blocks, e.g. 1,6,12 (--model only; default: after a "
                   "quarter, half, three quarters and all of the blocks)")
    p.add_argument("--bare", action="store_true", help="one merge state's picture alone, without the input and "
                   "captions (with --artifact, or --model and one block)")
    p.add_argument("--fill", default="mean", choices=FILLS, help="group fill: mean colour or palette (default mean)")
    p.add_argument("--scale", type=int, default=2, help="pixels per input pixel (default 2)")
    p.add_argument("--allow-large", action="store_true",
                   help="run even when the memory estimate exceeds half of this machine's memory")
    return p


def run(argv: Sequence[str]) -> int:
    from .. import visualize as vis
    from ..preprocess import open_image
    from ..schedule import parse_r_text

    args = parser().parse_args(argv)
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
        source = vis.ModelSource(args.model, parse_r_text(args.r), args.weights, args.checkpoint, args.seed,
                                 args.img_size, args.merge_impl, not args.no_prop_attn, args.allow_large)
        warn = lambda message: print(f"tome-export: warning: {message}", file=sys.stderr)  # noqa: E731
        picture, patch, states = vis.visualize_model(image, source, args.blocks, warn)
    if args.bare and len(states) != 1:
        raise UserError(f"--bare pictures one merge state; {len(states)} were asked: pass --blocks with one block")
    vis.save_picture(vis.picture(picture, patch, states, fill=args.fill, scale=args.scale, bare=args.bare),
                     args.output)
    print(f"wrote {args.output}: " + "; ".join(f"{s.title}, {s.num_groups} groups" for s in states))
    return 0


COMMAND = Command("visualize", run, "picture which patches ToMe merged into each token")
