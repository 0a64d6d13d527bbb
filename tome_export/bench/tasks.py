"""Fidelity figures of the encoder tasks (embed, dense, tokens) against the model without ToMe, and the digits
case's real task figures (k-NN accuracy of ``embed``, a linear probe on ``dense``).

Every task's figures carry ``cosine``: the one number a budget is set on (tune's ``--min-cosine``, the bench's
best stack). ``embed``: the mean cosine of each image's embedding with fp32 r=0's; ``dense``: the mean cosine of
each patch's features with fp32 r=0's; ``tokens``: the mean cosine of each image's pooled tokens (the mean over its
patches of the token holding each) with fp32 r=0's. Beside it, ``embed`` reports nearest-neighbour agreement (does
each image find the same nearest other image as at fp32 r=0) and ``tokens`` the tokens kept against the patches.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..graph_names import EMBEDDING_NAME, FEATURES_NAME, TOKEN_OWNERS_NAME, TOKEN_SIZES_NAME, TOKENS_NAME
from ..quality.validate import vector_cosines, vectors, wilson_interval

Outputs = Mapping[str, np.ndarray]


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).reshape(len(x), -1)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-30)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    """For each image, the index of the most similar other image (cosine) ``(N,)``."""
    unit = _unit(embeddings)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def embed_figures(reference: Outputs, candidate: Outputs) -> Dict[str, Any]:
    ref, cand = reference[EMBEDDING_NAME], candidate[EMBEDDING_NAME]
    cosines = vector_cosines(ref[:, None], cand[:, None])[:, 0]
    figures: Dict[str, Any] = {"cosine": float(cosines.mean()), "min_cosine": float(cosines.min()),
                               "images": int(len(ref))}
    if len(ref) > 2:
        same = int((nearest_neighbours(ref) == nearest_neighbours(cand)).sum())
        figures.update(nn_agreement=same / len(ref),
                       nn_interval_95=[round(v, 4) for v in wilson_interval(same, len(ref))])
    return figures


def dense_figures(reference: Outputs, candidate: Outputs) -> Dict[str, Any]:
    cosines = vector_cosines(vectors({FEATURES_NAME: reference[FEATURES_NAME]}),
                             vectors({FEATURES_NAME: candidate[FEATURES_NAME]}))  # (N, patches)
    per_image = cosines.mean(axis=1)
    return {"cosine": float(cosines.mean()), "min_image_cosine": float(per_image.min()),
            "min_patch_cosine": float(cosines.min()), "images": int(len(cosines))}


def pooled_tokens(outputs: Outputs) -> np.ndarray:
    """Each image's tokens pooled as the model without merging would pool its patches: the size-weighted mean
    ``(N, C)`` (prefix tokens, where kept, count once)."""
    tokens = outputs[TOKENS_NAME].astype(np.float64)
    sizes = outputs[TOKEN_SIZES_NAME].astype(np.float64)[..., None]
    return (tokens * sizes).sum(axis=1) / sizes.sum(axis=1)


def tokens_figures(reference: Outputs, candidate: Outputs) -> Dict[str, Any]:
    cosines = vector_cosines(pooled_tokens(reference)[:, None], pooled_tokens(candidate)[:, None])[:, 0]
    kept, patches = candidate[TOKENS_NAME].shape[1], candidate[TOKEN_OWNERS_NAME].shape[1]
    return {"cosine": float(cosines.mean()), "min_cosine": float(cosines.min()), "tokens_kept": int(kept),
            "tokens_in": int(reference[TOKENS_NAME].shape[1]), "patches": int(patches),
            "kept": f"{reference[TOKENS_NAME].shape[1]} -> {kept}", "images": int(len(cosines))}


FIGURES = {"embed": embed_figures, "dense": dense_figures, "tokens": tokens_figures}


def task_fidelity(task: str, reference: Outputs, candidate: Outputs) -> Dict[str, Any]:
    """The fidelity figures of a ``task`` variant's outputs against fp32 r=0's (both by output name)."""
    return {"task": task, **FIGURES[task](reference, candidate)}


# --- the digits case: the task on a real labelled split ---------------------------------------------------------

K_NEIGHBOURS = 5
RIDGE = 1e-2  # the probe's ridge, relative to the mean squared norm of the training features


class TaskProbe:
    """A real task figure for ``embed`` and ``dense`` on labelled images: what a downstream system built on the
    model without ToMe (its index, its head) gets from a variant's outputs.

    ``embed``: k-NN (k = 5, cosine, majority vote) against fp32 r=0 embeddings of the training split. ``dense``: a
    linear probe (ridge regression onto one-hot labels, over the flattened patch grid) fitted on fp32 r=0 features
    of the training split.
    """

    def __init__(self, task: str, train: Outputs, labels: np.ndarray) -> None:
        self.task, self.labels = task, np.asarray(labels)
        self.classes = int(self.labels.max()) + 1
        x = self._features(train)
        if task == "embed":
            self.index = _unit(x)
        else:
            self.mean = x.mean(axis=0)
            centred = x - self.mean
            gram = centred @ centred.T
            ridge = RIDGE * float(np.trace(gram)) / len(gram)
            onehot = np.eye(self.classes)[self.labels]
            self.weights = centred.T @ np.linalg.solve(gram + ridge * np.eye(len(gram)), onehot)

    def _features(self, outputs: Outputs) -> np.ndarray:
        name = EMBEDDING_NAME if self.task == "embed" else FEATURES_NAME
        return outputs[name].astype(np.float64).reshape(len(outputs[name]), -1)

    def predict(self, outputs: Outputs) -> np.ndarray:
        x = self._features(outputs)
        if self.task == "dense":
            return ((x - self.mean) @ self.weights).argmax(axis=1)
        nearest = np.argsort(-(_unit(x) @ self.index.T), axis=1, kind="stable")[:, :K_NEIGHBOURS]
        votes = self.labels[nearest]
        return np.array([np.bincount(v, minlength=self.classes).argmax() for v in votes])

    def accuracy(self, outputs: Outputs, labels: np.ndarray) -> Dict[str, Any]:
        method = (f"{K_NEIGHBOURS}-NN (cosine) against fp32 r=0 train embeddings" if self.task == "embed" else
                  "linear probe (ridge) on the patch grid, fitted on fp32 r=0 train features")
        return {"top1": float((self.predict(outputs) == np.asarray(labels)).mean()), "images": int(len(labels)),
                "method": method}


def probe_for(task: str) -> Optional[str]:
    """Which task has a real task figure on labelled images (None: the task has none)."""
    return task if task in ("embed", "dense") else None
