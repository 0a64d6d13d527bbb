"""The contract of a model family: one registration per family module, found by :mod:`tome_export.models`.

A family knows its names (resolving what a user types to an upstream name), how to create a model with
pretrained, random or checkpoint weights, which models it can patch (and why not, when it cannot), their static
shape facts and eval preprocessing, and the ToMe patch itself. ``models/__init__.py`` only looks families up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from ..info import ModelInfo
from ..preprocess import Preprocessing

StateDict = Dict[str, Any]


@dataclass(frozen=True)
class Family:
    """One model family. Every callable takes or returns the family's own model objects."""

    name: str  # recorded as the manifest's model.family, e.g. "timm-vit"
    source: str  # where its models and weights come from, the manifest's model.source, e.g. "timm"
    description: str
    # The upstream name of a name the user typed, or None when it is not this family's; a UserError for a
    # name that is this family's but wrong (e.g. unknown weights of a known architecture, a missing directory).
    resolve: Callable[[str], Optional[str]]
    # The model of an upstream name with pretrained weights, or randomly initialised (the caller seeds torch).
    create: Callable[..., Any]
    # (upstream name, checkpoint file, constructor kwargs) -> the checkpoint's state_dict in current key names and
    # the kwargs its architecture needs (class count, image size, ...); a UserError where the family takes none.
    load_checkpoint: Callable[[str, Path, Dict[str, Any]], Tuple[StateDict, Dict[str, Any]]]
    claims: Callable[[Any], bool]  # whether a model is of this family's kind (supported or not)
    unsupported_reason: Callable[[Any], Optional[str]]  # None when the family can patch the model
    model_info: Callable[[Any], ModelInfo]
    preprocessing: Callable[[Any], Preprocessing]  # the model's eval preprocessing
    patch: Callable[[Any, Any], Any]  # (model, ToMeConfig) -> the model, patched in place
    aliases: Mapping[str, str] = field(default_factory=dict)  # short names -> upstream names
    names: Callable[[], Sequence[str]] = lambda: ()  # names to suggest for a misspelt one
    verified: Tuple[Tuple[str, str, str], ...] = ()  # (family, names, what the tests check) for --list-models
    libraries: Tuple[str, ...] = ()  # modules whose versions manifests record
    # What the manifest records about a created model beside its name (e.g. the weights' tag or revision).
    manifest_fields: Callable[[str, Any], Dict[str, Any]] = lambda name, model: {}
    # Names are offered to the families in this order (then by name); the first that resolves a name has it.
    priority: int = 100
    # A small randomly initialised model of the family (few blocks, small images): what the registry's
    # conformance tests patch, export and compare, so a family is tested by registering it.
    example: Optional[Callable[[], Any]] = None
    # Why a task (tome_export.tasks: embed, dense, tokens) does not apply to a model, or None when it does.
    task_reason: Callable[[Any, str], Optional[str]] = lambda model, task: None
