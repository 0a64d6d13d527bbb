"""Classify images with a tome-export model served by Triton: preprocessing, request, top-5.

    python examples/triton_client.py --url 127.0.0.1:8000 --model vit_b16-r16-openvino-int8 photo.jpg more.png

The preprocessing (resize, centre crop, normalisation) is read from the model's config, where
``tome-export serve`` records it, and run with tome-export's NumPy/PIL preprocessing: the client needs
tome-export (no torch at run time), numpy, pillow and ``tritonclient[http]``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tritonclient.http as triton_http

from tome_export.errors import UserError
from tome_export.preprocess import Preprocessing, open_image
from tome_export.serve.triton import preprocessing_from_parameters


@dataclass(frozen=True)
class ServedModel:
    preprocessing: Preprocessing
    input_name: str
    output_name: str
    per_request: int  # images per request: up to max_batch_size, or exactly the graph's static batch
    static_batch: bool


def served_model(client: triton_http.InferenceServerClient, model: str) -> ServedModel:
    """What the server's model config says about inputs, outputs, batching and preprocessing."""
    config = client.get_model_config(model)
    max_batch = int(config.get("max_batch_size", 0))
    static = max_batch == 0  # the graph's fixed batch is then the first of the dims
    return ServedModel(preprocessing_from_parameters(config.get("parameters", {})), config["input"][0]["name"],
                       config["output"][0]["name"], int(config["input"][0]["dims"][0]) if static else max_batch,
                       static)


def classify(url: str, model: str, images: Sequence[Path]) -> np.ndarray:
    """Logits ``(len(images), classes)``; each request carries as many images as the model takes."""
    client = triton_http.InferenceServerClient(url)
    try:
        served = served_model(client, model)
        batch = np.stack([served.preprocessing(open_image(path)) for path in images])
        logits = []
        for start in range(0, len(batch), served.per_request):
            chunk = batch[start:start + served.per_request]
            missing = served.per_request - len(chunk) if served.static_batch else 0
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)]) if missing else chunk
            request = triton_http.InferInput(served.input_name, list(padded.shape), "FP32")
            request.set_data_from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
            result = client.infer(model, [request], outputs=[triton_http.InferRequestedOutput(served.output_name)])
            logits.append(result.as_numpy(served.output_name)[:len(chunk)])
        return np.concatenate(logits)
    finally:
        client.close()  # an open connection would hold the server's shutdown


def top_k(logits: np.ndarray, k: int = 5) -> List[List[Tuple[int, float]]]:
    """Per image, the k most likely classes as (index, softmax probability), most likely first."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[(int(c), float(probs[row, c])) for c in order[row]] for row in range(len(logits))]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Top-5 classes of images from a tome-export model on Triton.")
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP address (default 127.0.0.1:8000)")
    p.add_argument("--model", required=True, help="the model's name in the repository")
    p.add_argument("--labels", type=Path, help="class names, one per line (default: class indices)")
    args = p.parse_args(argv)
    names = args.labels.read_text().splitlines() if args.labels else None
    try:
        ranked = top_k(classify(args.url, args.model, args.images))
    except UserError as exc:
        print(f"triton_client: error: {exc}", file=sys.stderr)
        return 2
    for path, classes in zip(args.images, ranked):
        shown = ", ".join(f"{names[c] if names else c} {p:.3f}" for c, p in classes)
        print(f"{path}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
