"""What a build's artifact computes from the encoder: its task, the options the task takes, and its outputs.

Data only (no torch): the request, the manifest, the command line, ``inspect`` and ``serve`` read it.

* ``classify``: the model's own head (class logits; a bare vision model's pooled output), output ``logits``.
* ``embed``: the family's own pooled embedding (class token, size-weighted mean, attention pool, CLIP projection),
  optionally L2-normalised, output ``embeddings`` ``(B, D)``.
* ``dense``: every patch's features on the full input grid, ``features`` ``(B, patches, C)`` (``nchw``:
  ``(B, C, grid_h, grid_w)``): each patch gets the features of the final token that holds it.
* ``tokens``: the merged tokens themselves, ``tokens`` ``(B, N, C)``; ``token_sizes`` ``(B, N)`` (how many patches
  each token holds) and ``token_owners`` ``(B, patches)`` (which token holds each patch, row-major over the grid).
  Prefix tokens (class, distillation, registers) are dropped unless ``keep_prefix``, as LLaVA-style towers take
  patch tokens only.

``layer`` (dense, tokens) picks the encoder output as transformers' ``hidden_states`` index counts them: ``-1``
the last block's, ``-2`` the one before (LLaVA), ``k`` >= 1 the output of the first k blocks. ``final_norm``
applies the family's per-token final norm; by default only at the last layer, where the family applies it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import UserError
from .graph_names import (EMBEDDING_NAME, FEATURES_NAME, OUTPUT_NAME, TOKEN_OWNERS_NAME, TOKEN_SIZES_NAME,
                          TOKENS_NAME)

CLASSIFY, EMBED, DENSE, TOKENS = "classify", "embed", "dense", "tokens"
OUTPUTS: Dict[str, Tuple[str, ...]] = {
    CLASSIFY: (OUTPUT_NAME,),
    EMBED: (EMBEDDING_NAME,),
    DENSE: (FEATURES_NAME,),
    TOKENS: (TOKENS_NAME, TOKEN_SIZES_NAME, TOKEN_OWNERS_NAME),
}
TASKS: Tuple[str, ...] = tuple(OUTPUTS)
INTEGER_OUTPUTS = (TOKEN_SIZES_NAME, TOKEN_OWNERS_NAME)  # int64; every other output is float32
DESCRIPTIONS = {
    CLASSIFY: "the model's own head: class logits (a bare vision model's pooled output)",
    EMBED: "the family's pooled embedding (class token, mean, attention pool, CLIP projection)",
    DENSE: "patch features on the full input grid, unmerged from the final tokens",
    TOKENS: "the merged tokens, their sizes and which token holds each patch (vision-language towers)",
}


@dataclass(frozen=True)
class Task:
    """A build's task and its options. Each option field is a command-line flag whose metadata names the tasks
    that take it (the others refuse it); ``blocks_run`` is filled in against the model (:meth:`resolved`)."""

    name: str = CLASSIFY
    layer: Optional[int] = field(default=None, metadata={
        "tasks": (DENSE, TOKENS), "metavar": "L",
        "help": "the encoder output to take, as transformers' hidden_states counts: -1 the last block's "
                "(default), -2 the one before (LLaVA-style), k >= 1 after the first k blocks"})
    final_norm: Optional[bool] = field(default=None, metadata={
        "tasks": (DENSE, TOKENS),
        "help": "apply (or not) the family's per-token final norm (default: only at the last layer, as the "
                "family does)"})
    keep_prefix: bool = field(default=False, metadata={
        "tasks": (TOKENS,),
        "help": "keep the class / distillation / register tokens in front (default: patch tokens only, as "
                "LLaVA-style towers take them)"})
    normalize: bool = field(default=False, metadata={
        "tasks": (EMBED,), "help": "L2-normalise the embedding (cosine similarity becomes a dot product)"})
    nchw: bool = field(default=False, metadata={
        "tasks": (DENSE,), "help": "output the features as an image, (B, C, grid_h, grid_w), as conv heads take "
                                   "them (default (B, patches, C))"})
    blocks_run: Optional[int] = None  # resolved: how many blocks the artifact runs (None: not resolved yet)

    @property
    def outputs(self) -> Tuple[str, ...]:
        """The artifact's outputs, in the order the model returns them."""
        return OUTPUTS[self.name]

    def check(self) -> "Task":
        """This task, or a one-line UserError for an unknown task or an option it does not take."""
        if self.name not in TASKS:
            raise UserError(f"unknown --task {self.name!r}: choose one of {', '.join(TASKS)}")
        for f in option_fields():
            if getattr(self, f.name) != f.default and self.name not in f.metadata["tasks"]:
                raise UserError(f"{flag(f.name, getattr(self, f.name))} applies to --task "
                                f"{' or '.join(f.metadata['tasks'])}, not --task {self.name}")
        if self.layer == 0:
            raise UserError("--layer 0 is the patch embedding, before any block (nothing to merge): use -1 (the last "
                            "block's output), -2, or k >= 1")
        return self

    def resolved(self, num_blocks: int) -> "Task":
        """The task against a model of ``num_blocks`` blocks: ``blocks_run`` and ``final_norm`` filled in."""
        layer = -1 if self.layer is None else self.layer
        blocks = num_blocks + 1 + layer if layer < 0 else layer
        if not 1 <= blocks <= num_blocks:
            raise UserError(f"--layer {layer} is outside this model's {num_blocks} blocks: use -{num_blocks} to -1 "
                            f"or 1 to {num_blocks}")
        norm = self.final_norm if self.final_norm is not None else blocks == num_blocks
        return dataclasses.replace(self, blocks_run=blocks, final_norm=norm)

    def describe(self) -> str:
        """One line for people: the task and the options that differ from the defaults."""
        parts = [self.name]
        if self.name in (DENSE, TOKENS) and self.blocks_run is not None:
            layer = "" if self.layer is None else f" (--layer {self.layer})"
            parts.append(f"output of block {self.blocks_run}{layer}, final norm {'on' if self.final_norm else 'off'}")
        if self.name == TOKENS:
            parts.append("prefix tokens kept" if self.keep_prefix else "patch tokens only")
        if self.normalize:
            parts.append("L2-normalised")
        if self.nchw:
            parts.append("NCHW")
        return "; ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]]) -> "Task":
        """A task as a manifest records it (manifests before tasks existed: classify)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def output_dtype(name: str) -> str:
    """The element type an artifact's output has (numpy name)."""
    return "int64" if name in INTEGER_OUTPUTS else "float32"


def option_fields() -> Tuple[dataclasses.Field, ...]:
    """The fields of :class:`Task` that are options (command-line flags)."""
    return tuple(f for f in dataclasses.fields(Task) if "tasks" in f.metadata)


def flag(name: str, value: Any = True) -> str:
    """How an option is spelt on the command line (``--no-final-norm`` for a false ``final_norm``)."""
    text = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return text if value else "--no-" + text[2:]
    return f"{text} {value}"


def as_task(task: Any = CLASSIFY, **options: Any) -> Task:
    """A checked :class:`Task` from a name and options, or a Task (with ``options`` replacing its own)."""
    if isinstance(task, Task):
        return dataclasses.replace(task, **options).check() if options else task.check()
    if not isinstance(task, str):
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return Task(task, **options).check()
