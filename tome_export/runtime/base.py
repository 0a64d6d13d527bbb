"""The runner interface every backend implements: check inputs once here, infer in ``_infer``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import UserError
from ..preprocess import Preprocessing


class Runner:
    """Runs one built artifact directory. ``runner(batch) -> logits``; ``runner.preprocess(image) -> array``."""

    backend = "base"

    def __init__(self, directory: Path, manifest: Dict[str, Any], threads: Optional[int] = None,
                 throughput: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.threads = threads
        self.throughput = throughput
        shape = manifest["input"]["shape"]
        self.dynamic_batch = bool(manifest["input"].get("dynamic_batch"))
        self.batch_size: Optional[int] = None if self.dynamic_batch else int(shape[0])
        self.image_shape = tuple(int(v) for v in shape[1:])
        self.dtype = np.dtype(manifest["input"].get("dtype", "float32"))
        self.preprocessing = Preprocessing.from_dict(manifest["preprocessing"])

    def preprocess(self, image: Union[Image.Image, str, os.PathLike]) -> np.ndarray:
        """One image (PIL or path) -> ``(C, H, W)`` array, as the model was trained."""
        return self.preprocessing(image)

    def preprocess_batch(self, images: Sequence[Union[Image.Image, str, os.PathLike]]) -> np.ndarray:
        return np.stack([self.preprocess(img) for img in images])

    def check(self, batch: Any) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise UserError(f"expected a numpy array of shape (N, {', '.join(map(str, self.image_shape))}), "
                            f"got {type(batch).__name__}")
        if batch.dtype != self.dtype:
            raise UserError(f"expected dtype {self.dtype}, got {batch.dtype}: convert with batch.astype(np.{self.dtype})")
        want = (self.batch_size if self.batch_size is not None else "N", *self.image_shape)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.image_shape or (
                self.batch_size is not None and batch.shape[0] != self.batch_size) or batch.shape[0] < 1:
            hint = "" if self.batch_size is None else " (this artifact has a static batch; rebuild with --dynamic-batch)"
            raise UserError(f"expected input shape {want}, got {tuple(batch.shape)}{hint}")
        return np.ascontiguousarray(batch)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` of a preprocessed batch ``(N, C, H, W)``."""
        return self._infer(self.check(batch))

    def run_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        """Logits of several batches; in throughput mode backends overlap them (batch serving)."""
        return self._infer_many([self.check(b) for b in batches])

    def _infer(self, batch: np.ndarray) -> np.ndarray:  # backends implement this
        raise NotImplementedError

    def _infer_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:  # backends may overlap requests
        return [self._infer(b) for b in batches]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, input={(self.batch_size or 'N', *self.image_shape)})"
