"""Model registry: names, weights and the ToMe patch, looked up in the registered families.

Every module of this package that defines ``FAMILY`` (a :class:`~.family.Family`) is a model family; the modules
are found and imported the first time the registry is read, as are families other distributions declare in the
``tome_export.families`` entry-point group. This module has no knowledge of any particular family.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..errors import UserError
from ..info import ModelInfo
from ..preprocess import Preprocessing
from ..resources import check_seed
from ..schedule import RSpec, expand_schedule
from ..tasks import DENSE, Task, as_task
from .base import TaskPlan, ToMeConfig
from .checkpoint import load_checked
from .family import Family

ENTRY_POINTS = "tome_export.families"
WEIGHTS = ("pretrained", "random")
FAMILIES: Dict[str, Family] = {}
_ALIASES: Dict[str, Tuple[str, str]] = {}  # aliases registered from outside the families: alias -> (family, name)
_discovered = False


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def register_alias(alias: str, family: str, name: str) -> None:
    """A short name for a model of ``family`` (e.g. the benchmark's own model)."""
    _ALIASES[alias] = (family, name)


def families() -> List[Family]:
    """Every registered family, in the order names are offered to them (priority, then name)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules(__path__):
            imported = importlib.import_module(f"{__name__}.{module.name}")
            if isinstance(getattr(imported, "FAMILY", None), Family):
                register_family(imported.FAMILY)
        for entry in metadata.entry_points(group=ENTRY_POINTS):
            register_family(entry.load())
    return sorted(FAMILIES.values(), key=lambda f: (f.priority, f.name))


class ModelName(NamedTuple):
    """A resolved model name: what the user typed (alias), where it comes from and its upstream name."""

    alias: str
    source: str  # the family's source: timm | torchvision | ...
    name: str  # the upstream name, e.g. a timm model name or torchvision ``builder.WEIGHTS``
    family: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Which model was built and from which weights (recorded in manifests)."""

    alias: str
    name: str  # the upstream name (see ModelName)
    weights: str  # pretrained | random | checkpoint
    seed: Optional[int] = None
    checkpoint: Optional[str] = None
    source: str = "timm"
    details: Dict[str, Any] = field(default_factory=dict)  # what the family records beside the name

    def manifest_entry(self, family: str) -> Dict[str, Any]:
        timm_name = {"timm_name": self.details["timm_name"]} if "timm_name" in self.details else {}
        rest = {k: v for k, v in self.details.items() if k != "timm_name"}
        return {"alias": self.alias, "source": self.source, "name": self.name, **timm_name, "family": family,
                "weights": self.weights, "seed": self.seed, "checkpoint": self.checkpoint, **rest}


def all_aliases() -> Dict[str, str]:
    """Every alias and the upstream name it stands for."""
    aliases = {alias: name for f in families() for alias, name in f.aliases.items()}
    return {**aliases, **{alias: name for alias, (_, name) in _ALIASES.items()}}


def _alias(name: str) -> Optional[ModelName]:
    known = families()
    if name in _ALIASES:
        family, upstream = _ALIASES[name]
        return ModelName(name, FAMILIES[family].source, upstream, family)
    for f in known:
        if name in f.aliases:
            return ModelName(name, f.source, f.aliases[name], f.name)
    return None


def resolve(name: str) -> ModelName:
    """The family and upstream name of an alias, or of a name the first family (in priority order) recognises."""
    found = _alias(name)
    if found is not None:
        return found
    for f in families():
        upstream = f.resolve(name)
        if upstream is not None:
            return ModelName(name, f.source, upstream, f.name)
    close = suggestions(name)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model {name!r}.{hint} Use an alias ({', '.join(all_aliases())}) or a model name of a "
                    f"supported family (see `tome-export --list-models`).")


def suggestions(name: str, count: int = 3) -> List[str]:
    """Up to ``count`` aliases and model names close to ``name`` that build: a family's name list holds models it
    then refuses (timm's ``*vit*`` holds LeViT, MobileViT, ...), so each name is made on the meta device (no
    weights, milliseconds) and checked by its family first."""
    aliases = list(all_aliases())
    names = [n for f in families() for n in f.names()]
    found: List[str] = []
    for candidate in difflib.get_close_matches(name, aliases + names, n=4 * count):
        if len(found) == count:
            break
        if candidate in aliases or _builds(candidate):
            found.append(candidate)
    return found


def _builds(name: str) -> bool:
    for family in families():
        upstream = family.resolve(name)
        if upstream is None:
            continue
        try:
            with torch.device("meta"):
                model = _made_quickly(family, upstream)
        except Exception:  # a name the library lists but cannot make with its defaults
            return False
        return family.unsupported_reason(model) is None
    return False


def _made_quickly(family: Family, upstream: str) -> torch.nn.Module:
    """The model without its weight initialisation where the constructor can skip it (timm's ``weight_init``:
    ten times faster on the meta device); other constructors refuse the argument and are called without it."""
    try:
        return family.create(upstream, False, weight_init="skip")
    except (TypeError, UserError):  # families report a constructor's TypeError as a UserError
        return family.create(upstream, False)
    return False


def resolve_name(name: str) -> Tuple[str, str]:
    """``(alias, upstream name)`` of a model name."""
    ref = resolve(name)
    return ref.alias, ref.name


def create_model(name: str, weights: str = "pretrained", checkpoint: Optional[os.PathLike] = None, seed: int = 0,
                 **kwargs: Any) -> Tuple[torch.nn.Module, ModelSpec]:
    """Build a model by name, in eval mode, with pretrained, checkpoint or seeded random weights. ``kwargs`` go to
    the model's constructor (``img_size`` works for every family).

    timm's habit ``pretrained=True/False`` is read as ``weights="pretrained"/"random"``. Offline without cached
    pretrained weights this raises a :class:`UserError` naming the flags that work offline; it never falls back
    to random weights.
    """
    if "pretrained" in kwargs:
        pretrained = kwargs.pop("pretrained")
        if not isinstance(pretrained, bool):
            raise UserError(f"pretrained={pretrained!r}: pass weights='pretrained' or weights='random'")
        weights = "pretrained" if pretrained else "random"
    check_seed(seed)
    ref = resolve(name)
    family = FAMILIES[ref.family]
    if checkpoint is not None:
        sd, kwargs = family.load_checkpoint(ref.name, Path(checkpoint), kwargs)
        torch.manual_seed(seed)
        model = family.create(ref.name, False, **kwargs)
        load_checked(model, sd, str(checkpoint), f"{ref.alias} ({ref.name})")
        weighed = dict(weights="checkpoint", checkpoint=str(checkpoint))
    elif weights == "random":
        torch.manual_seed(seed)
        model = family.create(ref.name, False, **kwargs)
        weighed = dict(weights="random", seed=seed)
    elif weights == "pretrained":
        model = _create_pretrained(family, ref, kwargs)
        weighed = dict(weights="pretrained")
    else:
        raise UserError(f"unknown --weights {weights!r}: use pretrained or random (or --checkpoint PATH)")
    return model.eval(), ModelSpec(alias=ref.alias, name=ref.name, source=ref.source,
                                   details=family.manifest_fields(ref.name, model), **weighed)


def _create_pretrained(family: Family, ref: ModelName, kwargs: Dict[str, Any]) -> torch.nn.Module:
    try:
        return family.create(ref.name, True, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        if not _download_failure(exc):  # e.g. a constructor argument the model does not take
            raise UserError(f"cannot create {ref.alias} ({ref.name}) with pretrained weights: "
                            f"{type(exc).__name__}: {exc}") from None
        raise UserError(
            f"cannot load pretrained weights for {ref.alias} ({ref.name}): {type(exc).__name__}. Offline and not "
            f"cached? Use --checkpoint PATH for a local {ref.source} state_dict or --weights random for seeded "
            "random weights"
        ) from None


def _download_failure(exc: BaseException) -> bool:
    """Whether fetching weights failed (network, hub, missing cache file), as opposed to creating the model."""
    module = type(exc).__module__ or ""
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or module.startswith(
        ("huggingface_hub", "httpx", "requests", "urllib", "http.", "ssl", "socket"))


def family_of(model: torch.nn.Module) -> Family:
    """The family that can patch ``model``, or a UserError saying why none can."""
    claimed, others = [], []
    for f in families():
        reason = f.unsupported_reason(model)
        if reason is None:
            return f
        (claimed if f.claims(model) else others).append(reason)
    supported = "; ".join(f.description for f in families())
    why = claimed[0] if claimed else "; ".join(others)
    raise UserError(f"cannot apply ToMe to {type(model).__name__}: {why}. Supported: {supported}")


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Static shape facts of a supported model."""
    return family_of(model).model_info(model)


def estimated_info(name: str, **kwargs: Any) -> Optional[ModelInfo]:
    """The facts of the model ``create_model(name, **kwargs)`` would build, from a copy on the meta device (no
    memory, no weights), so a request that cannot fit is refused before the real model allocates anything; None
    where the family cannot build it there (a hub config that is not cached, an argument it refuses: the real
    creation then says why)."""
    try:
        with torch.device("meta"):
            model, _ = create_model(name, weights="random", **kwargs)
        return model_info(model)
    except Exception:  # noqa: BLE001 - only an estimate; create_model reports the problem itself
        return None


def preprocessing(model: torch.nn.Module) -> Preprocessing:
    """The model's eval preprocessing (resize, crop, mean/std, interpolation), from its family."""
    return family_of(model).preprocessing(model)


def patch(
    model: torch.nn.Module,
    r: RSpec = 0,
    *,
    merge_impl: str = "gather",
    prop_attn: Optional[bool] = None,
    trainable: bool = False,
    fused: bool = True,
) -> torch.nn.Module:
    """Apply ToMe to ``model`` in place and return it.

    ``r``: an int, an ``(r, inflect)`` pair or a list with one r per block. ``merge_impl``: ``gather`` or
    ``onehot`` (identical results; see :mod:`tome_export.merge`). Calling ``patch`` again re-configures
    the model.

    Every patched model is differentiable, in train and eval mode: which tokens merge is decided under
    ``no_grad`` (as in the reference), gradients flow through the size-weighted merge into the merged
    tokens, and dropout, attention dropout and drop-path run as in the unpatched model in train mode.

    ``prop_attn``: proportional attention (log of the token size added to the attention logits). Default:
    on for inference on off-the-shelf models, off with ``trainable=True`` — the reference's advice for
    fine-tuning with ToMe (and for MAE models off the shelf). Deploy a model with the ``prop_attn`` it
    was trained with (CLI: ``--no-prop-attn``).

    ``fused``: on CUDA tensors, run each block's matching and merge as Triton kernels (same decisions as
    ``merge_impl``; see :mod:`tome_export.kernels.fused_merge`). On CUDA, proportional attention runs in the
    formulation measured fastest on that GPU either way (:mod:`tome_export.kernels.designs`). Exports and CPU
    runs always use ``merge_impl`` and the additive mask.
    """
    family = family_of(model)
    info = family.model_info(model)
    if merge_impl == "auto":
        merge_impl = "gather"
    if prop_attn is None:
        prop_attn = not trainable
    requested = expand_schedule(r, info.num_blocks)  # blocks cap r at run time, as the reference does
    return family.patch(model, ToMeConfig(r=tuple(requested), merge_impl=merge_impl, prop_attn=prop_attn,
                                          fused=fused))


def set_task(model: torch.nn.Module, task: Any = "classify", **options: Any) -> Task:
    """Make ``model``'s ToMe forward return what ``task`` asks for (:mod:`tome_export.tasks`: ``classify``,
    ``embed``, ``dense``, ``tokens``, with their options, e.g. ``set_task(model, "tokens", layer=-2)``); returns the
    task resolved against the model (blocks run, final norm), as manifests record it.

    Works before or after :func:`patch` (patching again keeps the task); an unpatched model's own forward is
    unchanged. A task or option the model cannot answer is a UserError saying why.
    """
    family = family_of(model)
    task = as_task(task, **options)
    reason = family.task_reason(model, task.name)
    if reason is not None:
        raise UserError(f"--task {task.name} does not apply to {type(model).__name__}: {reason}")
    info = family.model_info(model)
    resolved = task.resolved(info.num_blocks)
    grid = _grid(info, family.preprocessing(model).input_size) if task.nchw else None
    model.tome_task = TaskPlan(task.name, resolved.blocks_run, bool(resolved.final_norm), info.num_protected,
                               task.keep_prefix, task.normalize, grid)
    return resolved


def _grid(info: ModelInfo, input_size: Tuple[int, ...]) -> Tuple[int, int]:
    """The patch grid ``(rows, columns)`` of ``input_size`` ``(C, H, W)``."""
    grid = (input_size[1] // info.patch_size[0], input_size[2] // info.patch_size[1])
    if grid[0] * grid[1] != info.num_patches:
        raise UserError(f"the model's {info.num_patches} patches do not form the {grid[0]} x {grid[1]} grid of its "
                        f"{input_size[1]} x {input_size[2]} input: --nchw cannot lay them out")
    return grid


class ListedModel(NamedTuple):
    alias: str
    source: str
    name: str


def list_models() -> List[ListedModel]:
    """Every alias with its source and upstream name."""
    return [ListedModel(alias, resolve(alias).source, name) for alias, name in all_aliases().items()]


def verified_families() -> List[Tuple[str, str, str, str]]:
    """``(source, family, names, what was checked)`` of every family the tests verify."""
    return [(f.source, *row) for f in families() for row in f.verified]


def family_libraries() -> Tuple[str, ...]:
    """The libraries of every family (whose versions manifests record), in family order."""
    return tuple(dict.fromkeys(lib for f in families() for lib in f.libraries))
