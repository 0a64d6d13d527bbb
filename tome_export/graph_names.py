"""Names in every exported ToMe graph: its input and outputs, and the prefixes that mark ToMe nodes by role.

``tome_match/<block>/...`` is the token-matching path (metric normalisation, scores, ranking, index building);
``tome_merge/<block>/...`` applies the merge (size weighting, gathers and scatter-adds or one-hot products, the
log-size attention bias). Quantizers, precision converters and inspection find ToMe nodes by these names.
"""

from __future__ import annotations

from typing import Tuple, Union

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
SOURCE_NAME = "source"  # optional output: which input tokens each final token holds

MATCH_PREFIX = "tome_match/"  # token-matching path: scores, ranking, index building (keep in fp32)
MERGE_PREFIX = "tome_merge/"  # applying merges: size weighting, gathers/scatters or one-hot products, log-size

# Ops that make shapes data-dependent or add control flow: a static ToMe graph has none of them (the export
# refuses them, and TensorRT's compatibility check reports them).
DYNAMIC_OPS = ("NonZero", "Loop", "If", "Scan", "Unique")


def block_of(node_name: str) -> str:
    """The block a ToMe node belongs to (``tome_match/blocks.3/...`` -> ``blocks.3``)."""
    return node_name.split("/", 2)[1]


def block_order(block: str) -> Tuple[Union[int, str], ...]:
    """Sort key of block names in model order (``blocks.2`` before ``blocks.10``)."""
    return tuple(int(p) if p.isdigit() else p for p in block.split("."))


# What a recipe's ``keep_fp32`` names -> the node-name prefixes kept out of quantization / precision conversion.
KEEP_FP32 = {"tome": (MATCH_PREFIX, MERGE_PREFIX), "match": (MATCH_PREFIX,), "none": ()}

# The outputs of each task (tome_export.tasks): classify has OUTPUT_NAME alone.
EMBEDDING_NAME = "embeddings"  # embed: one pooled embedding per image (B, D) ("embedding" is an exporter value name)
FEATURES_NAME = "features"  # dense: every patch's features on the full grid (B, patches, C), or (B, C, H, W)
TOKENS_NAME = "tokens"  # tokens: the merged tokens (B, N, C)
TOKEN_SIZES_NAME = "token_sizes"  # tokens: how many patches each token holds (B, N) int64
TOKEN_OWNERS_NAME = "token_owners"  # tokens: which token holds each patch (B, patches) int64
