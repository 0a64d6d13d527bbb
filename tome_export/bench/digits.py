"""An embedded accuracy case: a small ViT trained on scikit-learn's handwritten digits.

The data ship inside scikit-learn (1797 labelled 8x8 images), so accuracy vs r vs precision is a real
measurement offline, without ImageNet. Images are upscaled to 32x32 (patch 4: 64 patch tokens + class
token). The model is :mod:`tome_export.models.digits_vit` (``digits_vit``), a plain timm ViT. Training is seeded and
cached.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_path
from ..models.digits_vit import IMG_SIZE, MODEL_NAME, tome_digits_vit


@dataclass(frozen=True)
class DigitsSplit:
    train_x: np.ndarray  # (N, 3, 32, 32) float32, normalised
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsSplit:
    """The digits, upscaled to 32x32 RGB and normalised, split into train/test with a seeded shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    x = ((x.repeat(1, 3, 1, 1) - 0.5) / 0.5).numpy()
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return DigitsSplit(x[train], y[train], x[test], y[test])


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "tome-export" / "digits"


def train_digits_vit(epochs: int = 40, seed: int = 0, lr: float = 3e-4, batch: int = 64,
                     cache: Optional[Path] = None, log=lambda msg: None,
                     **model_kwargs) -> Tuple[Path, Dict[str, float]]:
    """Train (or load from the cache) the digits ViT; returns the checkpoint path and its fp32 test accuracy.

    AdamW at a low learning rate: ViTs on tiny data train badly at 1e-3 (measured 36-76% vs 98% at 3e-4).
    ``model_kwargs`` (e.g. depth, embed_dim) make smaller variants for quick tests; they are cached apart.
    Training says so before it starts, projects its duration from the first epoch, and keeps every finished
    epoch (model, optimizer and shuffle state) beside the checkpoint, so an interrupted run continues there and
    ends with the same weights as an uninterrupted one.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    variant = "".join(f"-{k}{v}" for k, v in sorted(model_kwargs.items()))
    path = cache / f"{MODEL_NAME}{variant}-seed{seed}-e{epochs}-lr{lr:g}.pth"
    split = load_digits_split(seed)
    if not path.is_file():
        _train(path, split, epochs, seed, lr, batch, log, model_kwargs)
    else:
        log(f"digits ViT: trained earlier, {_trained_note(path)} ({path})")
    model = tome_digits_vit(**model_kwargs)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(split.test_x)).argmax(-1).numpy()
    return path, {"test_accuracy": float((pred == split.test_y).mean()), "test_images": int(len(pred))}


def _trained_note(path: Path) -> str:
    seconds = path.with_name(path.name + ".seconds")
    try:
        return f"in {float(seconds.read_text()):.0f} s on this machine"
    except (OSError, ValueError):
        return "cached"


def _train(path: Path, split: DigitsSplit, epochs: int, seed: int, lr: float, batch: int, log,
           model_kwargs: Dict[str, object]) -> None:
    """Train into ``path``, keeping each finished epoch in ``<path>.partial`` (resumed from when present)."""
    partial = path.with_name(path.name + ".partial")
    torch.manual_seed(seed)
    model = tome_digits_vit(**model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    done, spent = _resume(partial, model, opt, gen)
    log(f"training the digits ViT before anything else: {epochs} epochs on {len(split.train_y)} images "
        + (f"(continuing after epoch {done}, kept from an interrupted run)" if done else "(not in the cache yet)")
        + f"; each epoch is kept, so an interrupted run continues; the checkpoint is cached in {path.parent}")
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    model.train()
    for epoch in range(done, epochs):
        started = time.perf_counter()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        took = time.perf_counter() - started
        spent += took
        with atomic_path(partial) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "epoch": epoch + 1, "seconds": spent}, tmp)
        left = (epochs - epoch - 1) * took
        log(f"digits ViT epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {took:.1f} s"
            + (f"; about {left / 60:.1f} min left at this pace" if left else ""))
    with atomic_path(path) as tmp:  # a half-trained or half-written checkpoint never lands in the cache
        torch.save(model.state_dict(), tmp)
    path.with_name(path.name + ".seconds").write_text(f"{spent:.1f}\n")
    partial.unlink(missing_ok=True)
    log(f"trained in {spent:.0f} s")


def _resume(partial: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
            ) -> Tuple[int, float]:
    """The epochs done and seconds spent by an interrupted run kept in ``partial`` (restored into the objects)."""
    if not partial.is_file():
        return 0, 0.0
    try:
        state = torch.load(partial, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        return int(state["epoch"]), float(state.get("seconds", 0.0))
    except Exception:  # unreadable (another version's): start over
        return 0, 0.0


def accuracy(run, split: DigitsSplit, batch: int = 64) -> float:
    """Top-1 accuracy of ``run(batch) -> logits`` on the test split (``batch`` must suit the artifact)."""
    correct = 0
    for i in range(0, len(split.test_y), batch):
        x = split.test_x[i:i + batch]
        n = len(x)
        if n < batch:  # static-batch artifacts: pad the last batch, ignore the padding
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        logits = np.asarray(run(np.ascontiguousarray(x)))[:n]
        correct += int((logits.argmax(-1) == split.test_y[i:i + n]).sum())
    return correct / len(split.test_y)
