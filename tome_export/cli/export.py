"""``tome-export [options]``: build a ToMe model for a target (the default command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .._version import __version__
from ..errors import UserError, ValidationError
from .common import Command, Parser, Progress
from .serve import add_build_arguments, print_served

DEFAULT_R = "16"
EXAMPLES = """examples:
  tome-export --model vit_b16 --r 16 --target onnx --weights random
  tome-export --model deit_s --r 16:-1 --dynamic-batch --output out/deit_s
  tome-export --model vit_t16 --r 8,8,8,8,8,8,8,8,8,8,8,8 --merge-impl onehot
  tome-export --model vit_b16 --checkpoint vit_b16.safetensors --batch 8
  tome-export --model vit_b16 --r 16 --target openvino --precision int8 --dynamic-batch --serve triton
  tome-export --model hf:google/vit-base-patch16-224 --r 16 --target openvino --precision int8
  tome-export --model ./my-finetuned-vit --r 8          # a save_pretrained directory (transformers)
  tome-export --model vit_s16 --r 8 --task dense --target openvino --weights random
  tome-export --model ./clip-vision-tower --r 12 --task tokens --layer -2 --target openvino --precision int8
  tome-export --list-models

--r takes an int (same r in every block), r:inflect (r varying linearly over the blocks,
inflect in [-1, 1], -1 merges more early) or one int per block. r is capped per block at
(tokens - protected) // 2, as in the ToMe reference; the manifest records what ran.
"""


def _target_arguments(p: argparse.ArgumentParser) -> None:
    """Each target option once, saying which targets take it (the others refuse it)."""
    from ..targets import targets
    from ..targets.base import option_flags

    group = p.add_argument_group("target options", "flags that only some targets take")
    for name, (fld, owners) in option_flags(list(targets().values())).items():
        if fld.metadata.get("core"):  # carried by a core flag (--dynamic-batch MIN:OPT:MAX)
            continue
        flag = "--" + name.replace("_", "-")
        text = f"{fld.metadata.get('help', '')} ({', '.join(owners)})"
        if fld.default is False:
            group.add_argument(flag, action="store_true", help=text)
        else:
            group.add_argument(flag, metavar=fld.metadata.get("metavar"), help=text)


def task_arguments(p: argparse.ArgumentParser) -> None:
    """--task and each task option (from the fields of tome_export.tasks.Task), saying which tasks take it."""
    from ..tasks import DESCRIPTIONS, TASKS, option_fields

    group = p.add_argument_group("task", "what the artifact outputs: " + "; ".join(
        f"{name}: {text}" for name, text in DESCRIPTIONS.items()))
    group.add_argument("--task", choices=TASKS, default="classify", help="(default classify)")
    for fld in option_fields():
        flag = "--" + fld.name.replace("_", "-")
        text = f"{fld.metadata['help']} ({', '.join(fld.metadata['tasks'])})"
        if fld.default is False:
            group.add_argument(flag, action="store_true", help=text)
        elif fld.type in ("Optional[bool]", Optional[bool]):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=int, metavar=fld.metadata.get("metavar"), help=text)


def task_of(args: argparse.Namespace) -> Any:
    """The task the command line asks for (checked: an option of another task is a UserError)."""
    from ..tasks import as_task, option_fields

    options = {f.name: getattr(args, f.name) for f in option_fields() if getattr(args, f.name) != f.default}
    return as_task(args.task, **options)


def parser() -> argparse.ArgumentParser:
    from ..targets import targets
    from . import DEFAULT, commands

    subcommands = sorted(name for name in commands() if name != DEFAULT)
    p = Parser(prog="tome-export", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Export a Token Merging (ToMe) ViT as a static-shape graph for a deployment backend, "
               "validated against PyTorch. Subcommands: " + ", ".join(subcommands) + ".")
    p.add_argument("--model", help="alias (vit_b16, deit_s, tv_vit_b16, ...), a timm or torchvision ViT name, "
                   "hf:<repo id> (transformers, hub or its cache), a save_pretrained directory, or any name a "
                   "supported family recognises (see --list-models)")
    p.add_argument("--r", help="tokens merged per block: 16 | 16:-1 | 8,8,... (default 16; capped per block "
                   "silently when defaulted, with a warning when given)")
    p.add_argument("--target", help=f"one of {', '.join(sorted(targets()))} (default onnx)")
    p.add_argument("--precision", help="fp32 | fp16 | bf16 | int8 ... as the target supports (default fp32; fp16 "
                   "for the GPU targets tensorrt and tensorrt-rtx)")
    p.add_argument("--recipe", type=Path, help="a recipe YAML file (default: the built-in "
                   "recipes/<target>-<precision>.yaml, installed as tome_export/recipes/)")
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
    limits = p.add_argument_group("validation", "limits that replace the recipe's validation thresholds (same names; "
                                  "the manifest notes the change), and what to keep when validation fails")
    limits.add_argument("--max-abs-diff", type=float, metavar="X", help="largest logit difference allowed")
    limits.add_argument("--min-cosine", type=float, metavar="X", help="smallest per-image logit cosine allowed")
    limits.add_argument("--min-top1-agreement", type=float, metavar="X",
                        help="smallest share of images whose top-1 class matches PyTorch's")
    limits.add_argument("--keep-failed", type=Path, metavar="DIR", help="when validation fails, write the failed "
                        "build, its fp32 export and its validation report to DIR, marked failed (inspect shows it; "
                        "runtime.load and serve refuse it)")
    p.add_argument("--force", action="store_true", help="replace an output directory holding another model's build")
    p.add_argument("--allow-large", action="store_true",
                   help="build even when the memory estimate exceeds half of this machine's memory")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    p.add_argument("--list-models", action="store_true", help="print the model aliases and supported families")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout (the build's directory "
                   "and manifest, or the --list-models listing)")
    p.add_argument("--version", "-V", action="version", version=f"tome-export {__version__}")
    task_arguments(p)
    _target_arguments(p)
    add_build_arguments(p)
    return p


def list_models_json() -> Dict[str, Any]:
    """What ``--list-models --json`` prints."""
    from ..models import families, list_models, verified_families
    from ..models.paper import PAPER_CHECKPOINTS, describe

    return {"aliases": [{"alias": a, "source": s, "name": n} for a, s, n in list_models()],
            "families": [{"name": f.name, "description": f.description} for f in families()],
            "verified": [{"source": s, "family": f, "models": n, "checked": c} for s, f, n, c in verified_families()],
            "paper_checkpoints": [describe(entry) for entry in PAPER_CHECKPOINTS]}


def list_models() -> int:
    from ..models import families, list_models, verified_families
    from ..models.paper import PAPER_CHECKPOINTS, SOURCE, describe

    print("aliases (vit_t16 ... vit_l16_384 pin the AugReg weights the ToMe paper used, augreg_in21k_ft_in1k; a bare")
    print("timm name follows timm's default tag, e.g. vit_base_patch16_224 -> augreg2_in21k_ft_in1k):")
    for alias, source, name in list_models():
        print(f"  {alias:18s} {source:12s} {name}")
    print("families:")
    for family in families():
        print(f"  {family.name}: {family.description}")
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


def _target_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The target options given on the command line (unset ones are left to the target's defaults)."""
    from ..targets import targets
    from ..targets.base import option_flags

    given: Dict[str, Any] = {}
    for name, (fld, _) in option_flags(list(targets().values())).items():
        value = getattr(args, name, None)
        if fld.metadata.get("core"):
            value = value if isinstance(value, str) else None
        if value is not None and value is not False:
            given[name] = str(value) if isinstance(value, Path) else value
    return given


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)  # before the build stack is imported: --help stays quick
    if args.list_models:
        if args.json:
            print(json.dumps(list_models_json(), indent=2))
            return 0
        return list_models()
    if not args.model:
        raise UserError("--model is required (e.g. --model vit_b16; see --list-models)")
    from ..pipeline import THRESHOLD_FLAGS, BuildRequest, build, prepare
    from ..schedule import CAP_WARNING, parse_r_text

    request = BuildRequest(
        model=args.model, r=parse_r_text(args.r if args.r is not None else DEFAULT_R), target=args.target,
        precision=args.precision, batch=args.batch, dynamic_batch=bool(args.dynamic_batch), opset=args.opset,
        output=args.output,
        weights=args.weights, checkpoint=args.checkpoint, seed=args.seed, merge_impl=args.merge_impl,
        prop_attn=not args.no_prop_attn, img_size=args.img_size, force=args.force, recipe=args.recipe,
        allow_large=args.allow_large,
        target_options=_target_options(args), trace_source=args.trace_source, task=task_of(args),
        thresholds={key: getattr(args, key) for key in THRESHOLD_FLAGS if getattr(args, key) is not None},
        keep_failed=args.keep_failed,
    )
    prepared = prepare(request)  # cheap checks first, before any progress display
    serving = _serving(args, prepared.output)
    # loading, exporting (where the target builds from ONNX), building and validating, storing the self-check
    progress = Progress(4 if prepared.target.needs_onnx else 3, args.quiet)
    # The default r caps in the last blocks of most models, as in the reference: said only for a chosen r.
    warn = progress.warn if args.r is not None else (
        lambda message: None if message.startswith(CAP_WARNING) else progress.warn(message))
    try:
        result = build(prepared, log=progress, warn=warn)
        progress.done()
    except ValidationError as exc:
        raise _failure(args, exc) from None
    finally:
        progress.close()
    served = None
    if serving is not None:
        from ..serve import serve_artifact

        served = serve_artifact(result.path, args.serve, args.serve_repository, serving, args.force)
    _report(args, result, served)
    return 0


def _failure(args: argparse.Namespace, exc: ValidationError) -> ValidationError:
    """The failed validation, saying where the build was kept or how to keep it and which flag would accept it;
    with ``--json`` its report goes to stdout as well."""
    flags = ", ".join(f"--{key.replace('_', '-')}" for key in exc.report.get("missed", [])) or "--min-cosine"
    kept = (f"the failed build is kept in {exc.kept} (tome-export inspect {exc.kept})" if exc.kept else
            "--keep-failed DIR keeps the failed build to look at")
    message = f"{exc}. {kept}; {flags} set the threshold without editing the recipe"
    if args.json:
        print(json.dumps({"path": None, "failed": {"reason": str(exc), "report": exc.report, "kept": exc.kept}},
                         indent=2, default=str))
    failure = ValidationError(message, exc.report)
    failure.kept = exc.kept
    return failure


def _serving(args: argparse.Namespace, output: Path) -> Any:
    """``--serve``'s options, its repository entry checked before any work (None without ``--serve``)."""
    if not args.serve:
        return None
    from ..serve import TritonOptions, check_request

    serving = TritonOptions(variant=args.serve_variant)
    check_request(output, args.serve, args.serve_repository, serving, args.force)
    return serving


def _report(args: argparse.Namespace, result: Any, served: Any) -> None:
    """What was built (and served): the summary, or with ``--json`` one JSON document."""
    if args.json:
        report = {"path": str(result.path), "manifest": result.manifest,
                  "served": str(served.model_dir) if served else None, "kept": list(result.kept)}
        print(json.dumps(report, indent=2, default=str))
        return
    from ..inspection import build_summary
    from ..manifest import Manifest

    print("\n".join(build_summary(result.path, Manifest.from_dict(result.manifest))))
    for rel in result.kept:
        print(f"  kept       {rel} (not tome-export's: left in place)")
    if served is not None:
        print_served(served)


COMMAND = Command("export", run, "build a ToMe model for a target (the default command)")
