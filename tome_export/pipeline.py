"""The build pipeline behind ``tome-export``: model -> ToMe patch -> ONNX -> target artifacts -> manifest.

Everything is written into a hidden temporary directory beside the output and renamed into place at the
end, so an interrupted or failed build never leaves a directory that looks complete.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

try:
    import fcntl
except ImportError:  # not POSIX: work directories are not locked, stale ones are not cleaned
    fcntl = None

from ._version import __version__
from .backends import TARGETS, BuildContext
from .errors import UserError
from .export import MIN_OPSET, export_onnx
from .flops import flops_summary
from .manifest import MANIFEST, read_manifest, write_manifest
from .merge import MERGE_IMPLS
from .models import create_model, model_info, patch, resolve
from .preprocess import Preprocessing
from .recipes import Recipe, load_recipe, recipe_for
from .schedule import RSpec, expand_schedule, r_label, resolve_schedule


@dataclass(frozen=True)
class BuildOptions:
    model: str
    r: RSpec = 16
    target: Optional[str] = None  # default: the recipe's, else onnx
    precision: Optional[str] = None  # default: the recipe's, else fp32
    batch: int = 1
    dynamic_batch: bool = False
    opset: Optional[int] = None  # default: the recipe's, else 18
    output: Optional[Path] = None
    weights: str = "pretrained"
    checkpoint: Optional[Path] = None
    seed: int = 0
    merge_impl: str = "auto"
    prop_attn: bool = True
    img_size: Optional[int] = None
    force: bool = False
    trace_source: bool = False
    validation_images: int = 8
    recipe: Optional[Path] = None  # a recipe file; default: recipes/<target>-<precision>.yaml
    extra: Dict[str, Any] = field(default_factory=dict)  # target-specific settings from the CLI
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # timm architecture arguments (e.g. depth)

    def resolve(self) -> Tuple["BuildOptions", Recipe]:
        """Fill target, precision and opset from the recipe (explicit options must agree with a --recipe)."""
        if self.recipe is not None:
            recipe = load_recipe(Path(self.recipe))
            for key in ("target", "precision"):
                mine = getattr(self, key)
                if mine is not None and mine != getattr(recipe, key):
                    raise UserError(
                        f"--{key} {mine} contradicts the recipe {str(self.recipe)!r} ({key}: {getattr(recipe, key)}); "
                        f"drop --{key} or edit the recipe"
                    )
        else:
            target, precision = self.target or "onnx", self.precision or "fp32"
            if target not in TARGETS:
                raise UserError(f"unknown --target {target!r}; available: {', '.join(sorted(TARGETS))}")
            if precision not in TARGETS[target].precisions:
                raise UserError(
                    f"--precision {precision!r} is not available for --target {target}; "
                    f"choose one of {', '.join(TARGETS[target].precisions)}"
                )
            recipe = recipe_for(target, precision)
        opset = self.opset if self.opset is not None else (recipe.opset or MIN_OPSET)
        return replace(self, target=recipe.target, precision=recipe.precision, opset=opset), recipe

    def default_output(self) -> Path:
        return Path("tome-out") / f"{_output_stem(self.model)}-{r_label(self.r)}-{self.target}-{self.precision}"


def _output_stem(model: str) -> str:
    """A model name as one directory name: the repo name of ``hf:<owner>/<name>``, the last part of a path."""
    if model.startswith("hf:"):
        return model.rsplit("/", 1)[-1]
    if "/" in model or "\\" in model or model.startswith((".", "~")):
        return Path(model).expanduser().resolve().name or "model"
    return model


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Dict[str, Any]


def check_options(opts: BuildOptions) -> None:
    """Reject bad options (of resolved options, see BuildOptions.resolve) before any slow work."""
    target = TARGETS[opts.target]
    for module in target.requires:
        try:
            __import__(module)
        except ImportError:
            raise UserError(
                f"--target {opts.target} needs the Python package {module!r}, which is not installed: "
                f"pip install 'tome-export[{opts.target}]'"
            ) from None
    if opts.merge_impl not in ("auto",) + MERGE_IMPLS:
        raise UserError(f"unknown --merge-impl {opts.merge_impl!r}; choose auto, {', '.join(MERGE_IMPLS)}")
    if opts.batch < 1:
        raise UserError(f"--batch must be >= 1, got {opts.batch}")
    if opts.opset < MIN_OPSET:
        raise UserError(
            f"--opset {opts.opset} is too low: ToMe's scatter-add needs opset >= 16 (lower opsets silently drop "
            f"merges) and the exporter needs >= {MIN_OPSET}; use --opset {MIN_OPSET} or higher"
        )
    if opts.img_size is not None and opts.img_size < 16:
        raise UserError(f"--img-size must be a positive image side in pixels, got {opts.img_size}")
    if opts.checkpoint is not None and not Path(opts.checkpoint).is_file():
        raise UserError(f"checkpoint {str(opts.checkpoint)!r} does not exist: pass the path of a .pth or .safetensors file")
    for key, value in opts.extra.items():  # keys are named as the CLI flags that set them
        if key not in target.options:
            shown = f" {value}" if isinstance(value, str) else ""
            raise UserError(f"--{key.replace('_', '-')}{shown} does not apply to --target {opts.target}")


def _check_output(out: Path, identity: Dict[str, Any], force: bool) -> None:
    """Refuse to overwrite anything but an earlier build of the same model, target and precision."""
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {str(parent)!r} (not a writable directory): choose another --output")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--output {str(out)!r} exists and is not a directory: choose another --output")
    if not os.access(out, os.W_OK):
        raise UserError(f"cannot write to {str(out)!r}: choose another --output")
    if not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise UserError(
            f"--output {str(out)!r} already holds files that tome-export did not write: choose another --output"
        )
    try:
        existing = read_manifest(out, verify=False)
    except UserError:
        existing = {}
    same = _model_identity(existing.get("model", {})) == _model_identity(identity["model"]) and \
        existing.get("target") == identity["target"] and existing.get("precision") == identity["precision"]
    if not same and not force:
        old = existing.get("model", {}).get("alias", "another model")
        raise UserError(
            f"--output {str(out)!r} already holds artifacts of {old} ({existing.get('target')}, "
            f"{existing.get('precision')}): choose another --output or pass --force to replace them"
        )


def _model_identity(model: Dict[str, Any]) -> Tuple[Any, ...]:
    """(alias, source, upstream name); manifests written before torchvision support had only timm_name."""
    return model.get("alias"), model.get("source", "timm"), model.get("name", model.get("timm_name"))


def _locked_workdir(parent: Path, prefix: str) -> Tuple[Path, Optional[int]]:
    """A new hidden directory and an open descriptor holding an exclusive lock on it.

    The lock lives as long as the process: a build killed mid-way (even by SIGKILL) leaves an unlocked
    directory, which is how the next build tells a stale work directory from one in use.
    """
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        if fcntl is None:
            return path, None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a concurrent cleaner took it for stale before we locked it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _remove_stale_workdirs(parent: Path, name: str) -> None:
    """Remove the hidden work directories of earlier builds of ``name`` that were killed mid-way."""
    if fcntl is None or not parent.is_dir():
        return
    pattern = glob.escape(str(parent / f".{name}."))
    for path in glob.glob(pattern + "tmp-*") + glob.glob(pattern + "old-*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: a build in progress
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing output is swapped out, then removed."""
    if out.exists():
        old, fd = _locked_workdir(out.parent, f".{out.name}.old-")
        try:
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    else:
        os.replace(tmp, out)


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import timm
    import torchvision

    versions = {"tome_export": __version__, "torch": torch.__version__.split("+")[0], "timm": timm.__version__,
                "torchvision": torchvision.__version__.split("+")[0],
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    transformers = sys.modules.get("transformers")  # imported only when a transformers model was built
    if transformers is not None:
        versions["transformers"] = transformers.__version__
    return versions


def prepare(opts: BuildOptions) -> Tuple[BuildOptions, Recipe, Path]:
    """All checks that need no model: options, recipe, model name, output directory."""
    opts, recipe = opts.resolve()
    check_options(opts)
    if TARGETS[opts.target].check is not None:
        TARGETS[opts.target].check(opts, recipe)
    # The form of r (type, sign, inflect range) needs no model; only a list's length waits for the model.
    expand_schedule(opts.r, len(opts.r) if isinstance(opts.r, list) else 2)
    out = Path(opts.output) if opts.output is not None else opts.default_output()
    ref = resolve(opts.model)
    identity = {"model": {"alias": ref.alias, "source": ref.source, "name": ref.name},
                "target": opts.target, "precision": opts.precision}
    _check_output(out, identity, opts.force)
    return opts, recipe, out


def build(opts: BuildOptions, log: Callable[[str], None] = lambda msg: None) -> BuildResult:
    """Run the whole build; returns the output directory and its manifest."""
    started = time.perf_counter()
    opts, recipe, out = prepare(opts)
    target = TARGETS[opts.target]

    log("loading model")
    kwargs = {**opts.model_kwargs, **({"img_size": opts.img_size} if opts.img_size else {})}
    model, spec = create_model(opts.model, weights=opts.weights, checkpoint=opts.checkpoint, seed=opts.seed, **kwargs)
    info = model_info(model)
    schedule = resolve_schedule(opts.r, info.num_blocks, info.num_tokens, info.num_protected)
    if schedule.capped:
        log(f"warning: {schedule.cap_message()}")
    merge_impl = opts.merge_impl
    if merge_impl == "auto":
        merge_impl = recipe.merge_impl if recipe.merge_impl not in (None, "auto") else target.default_merge_impl
    patch(model, list(schedule.requested), merge_impl=merge_impl, prop_attn=opts.prop_attn)
    pre = Preprocessing.from_model(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_workdirs(out.parent, out.name)
    tmp, lock = _locked_workdir(out.parent, f".{out.name}.tmp-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output should not be
        log(f"exporting ONNX (opset {opts.opset}, merge {merge_impl})")
        onnx_path = export_onnx(
            model, tmp / "model.onnx", pre.input_size, batch=opts.batch, dynamic_batch=opts.dynamic_batch,
            opset=opts.opset, trace_source=opts.trace_source,
            metadata=[("tome_export.version", __version__), ("tome_export.r_schedule", str(list(schedule.r)))],
        )
        ctx = BuildContext(
            workdir=tmp, onnx_path=onnx_path, model=model, spec=spec, info=info, schedule=schedule,
            preprocessing=pre, precision=opts.precision, batch=opts.batch, dynamic_batch=opts.dynamic_batch,
            merge_impl=merge_impl, recipe=recipe, options=opts, log=log,
        )
        log(f"building {opts.target} {opts.precision} and validating against PyTorch")
        target_result = target.build(ctx)
        batch_dim: Any = "batch" if opts.dynamic_batch else opts.batch
        manifest = {
            "tool_version": __version__,
            "versions": _versions(),
            "model": {**spec.manifest_entry(info.family),
                      **({"model_kwargs": dict(opts.model_kwargs)} if opts.model_kwargs else {})},
            "target": opts.target,
            "precision": opts.precision,
            "r": opts.r if not isinstance(opts.r, tuple) else {"r": opts.r[0], "inflect": opts.r[1]},
            "r_requested": list(schedule.requested),
            "r_schedule": list(schedule.r),
            "r_capped": schedule.capped,
            "tokens_per_block": list(schedule.tokens),
            "num_tokens": schedule.num_tokens,
            "num_protected": schedule.num_protected,
            "patch_size": list(info.patch_size),
            "merge_impl": merge_impl,
            "prop_attn": opts.prop_attn,
            "opset": opts.opset,
            "recipe": recipe.to_dict(),
            "input": {"name": "images", "shape": [batch_dim, *pre.input_size], "dtype": "float32",
                      "dynamic_batch": opts.dynamic_batch},
            "outputs": ["logits", "source"] if opts.trace_source else ["logits"],
            "num_classes": info.num_classes,
            "preprocessing": pre.to_dict(),
            "flops": flops_summary(info, schedule.r),
            **target_result,
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        write_manifest(tmp, manifest)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    return BuildResult(out, read_manifest(out, verify=False))
