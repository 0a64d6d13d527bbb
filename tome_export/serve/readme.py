"""The README.md written beside each served model: how to run it, what it takes, how to call it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from .._version import __version__
from ..manifest import Manifest
from ..preprocess import Preprocessing
from ..targets import get_target
from .triton import ModelPlan

TESTED = ("tome-export's tests serve Python-backend repositories on a real `tritonserver` 2.51 (the one in the "
          "`nvidia-pytriton` 0.7.0 wheel, which ships only the Python backend) and compare its logits with "
          "`tome_export.runtime` to 1e-5. The native onnxruntime, openvino and tensorrt backends are not in that "
          "wheel and were not run: their configurations are checked against Triton's ModelConfig schema and against "
          "the graph's names and dimensions, and their parameters follow the backends' source.")

# What each task's outputs are, for the README's reader.
OUTPUT_MEANING = {
    "classify": "the output is raw logits (apply a softmax for probabilities)",
    "embed": "the output is one pooled embedding per image (compare them by cosine similarity)",
    "dense": "the output holds every patch's features on the input grid, row-major (each patch gets the features "
             "of the merged token that holds it)",
    "tokens": "the outputs are the merged tokens, each token's size (patches it holds) and, per patch, the index of "
              "the token holding it (row-major over the grid)",
}


def validation_line(manifest: Manifest) -> str:
    v = manifest.validation
    if not v:
        return "no validation recorded"
    agreement = (f"top-1 agreement {v['top1_agreement']:.3f}" if "top1_agreement" in v else
                 f"mean vector cosine {v.get('mean_vector_cosine', float('nan')):.5f}")
    return (f"{v.get('backend')}: max |diff| {v.get('max_abs_diff', float('nan')):.2e}, min cosine "
            f"{v.get('min_cosine', float('nan')):.5f}, {agreement} vs PyTorch ToMe on {v.get('images')} photos")


def _io_lines(plan: ModelPlan, task: str = "classify") -> List[str]:
    batched = plan.batching.max_batch_size > 0
    lines = []
    for kind, specs in (("input", plan.inputs), ("output", plan.outputs)):
        for spec in specs:
            dims = list(spec.shape[1:] if batched else spec.shape)
            lines.append(f"- {kind} `{spec.name}`: {spec.dtype}, dims {dims}" +
                         (" (plus the batch dimension)" if batched else ""))
    lines.append(f"- batching: max_batch_size {plan.batching.max_batch_size}; {plan.batching.reason}" +
                 (f"; dynamic batching waits up to {plan.queue_delay_us} µs to fill a batch" if plan.batching.dynamic else ""))
    lines.append(f"- {OUTPUT_MEANING.get(task, OUTPUT_MEANING['classify'])}")
    return lines


def _preprocessing_lines(manifest: Manifest) -> List[str]:
    described = Preprocessing.from_dict(manifest.preprocessing).describe()
    return [f"{described['steps']}; mean {described['mean']}, std {described['std']}; stack images into a batch.",
            "",
            "The same values are in config.pbtxt as `preprocessing.*` parameters, which the client below reads back; "
            "`tome_export.preprocess.Preprocessing` implements these steps with NumPy and PIL (no torch)."]


def _client_lines(plan: ModelPlan) -> List[str]:
    first = plan.outputs[0].name
    if first == "logits":
        use = [f"logits = client.infer(\"{plan.name}\", [request]).as_numpy(\"{first}\")",
               "print(np.argsort(-logits, axis=1)[:, :5])  # top-5 class indices per image"]
    else:
        use = [f"result = client.infer(\"{plan.name}\", [request])",
               *[f"{o.name} = result.as_numpy(\"{o.name}\")  # {o.dtype}, dims {list(o.shape[1:])} per image"
                 for o in plan.outputs]]
    return ["```python",
            "import numpy as np, tritonclient.http as triton_http",
            "from tome_export.serve.triton import preprocessing_from_parameters",
            "",
            "client = triton_http.InferenceServerClient(\"127.0.0.1:8000\")",
            f"config = client.get_model_config(\"{plan.name}\")",
            "pre = preprocessing_from_parameters(config[\"parameters\"])",
            "batch = np.stack([pre(\"photo.jpg\")])" + ("" if plan.batching.max_batch_size else
                                                      f"  # exactly {plan.inputs[0].shape[0]} image(s) per request"),
            f"request = triton_http.InferInput(\"{plan.inputs[0].name}\", list(batch.shape), \"FP32\")",
            "request.set_data_from_numpy(batch)",
            *use,
            "```",
            "",
            f"or, from the tome-export source tree: `python examples/triton_client.py --model {plan.name} photo.jpg`"]


def _server_lines(plan: ModelPlan, manifest: Manifest, repository: Path) -> List[str]:
    lines = ["```", f"tritonserver --model-repository {os.path.abspath(repository)}", "```"]
    if plan.variant == "python":
        target = get_target(manifest.target)
        extras = target.runtime_extra
        nvidia = f"   # and {target.runtime_elsewhere}" if target.runtime_elsewhere else ""
        backend = "torch (the backend here)" if "aoti" in extras.split(",") else "the backend, no torch"
        lines += ["", "The Python backend runs `1/model.py`, which loads `1/artifact/` with `tome_export.runtime.load` "
                  "(checksums verified) — the code path the build validated. The server's Python needs tome-export "
                  f"and {backend}:",
                  "", "```", f"pip install '/path/to/tome-export[{extras}]'   # its source tree or wheel, version "
                  f"{__version__}{nvidia}", "```"]
    else:
        lines += ["", f"Triton's native `{plan.backend}` backend loads `1/{plan.default_model_filename}`."]
    return lines


def _runtime_settings(manifest: Manifest) -> str:
    runtime = {k: v for k, v in manifest.runtime.items() if k != "file"}
    flat = {**{k: v for k, v in runtime.items() if k != "config"}, **runtime.get("config", {})}
    return ", ".join(f"{k}={v}" for k, v in flat.items()) or "none"


LIMITS = [
    "- Requests whose shape, batch or element type does not fit the model are answered with HTTP 400 (gRPC "
    "INVALID_ARGUMENT), by Triton or, where a config edit lets them through, by the Python-backend model, which "
    "checks the claimed shape before it reads the data.",
    "- Triton's HTTP endpoint converts JSON-encoded tensor data (`\"data\": [...]`) into a buffer of the size the "
    "request's shape claims before checking that shape against the model: with tritonserver 2.51 a JSON request "
    "claiming a shape of 2**40 elements aborted the server (std::bad_alloc). Clients here send binary tensors "
    "(`tritonclient`'s default); where untrusted clients reach the HTTP port, put a proxy in front that limits "
    "request size, or expose only gRPC.",
]


def render_readme(plan: ModelPlan, manifest: Manifest, artifact: Path, repository: Path) -> str:
    model = manifest.model
    task = "" if manifest.task.name == "classify" else f", task {manifest.task.describe()}"
    title = (f"{model.get('alias')} ToMe r {list(manifest.r_schedule)}, {manifest.target} {manifest.precision}{task}, "
             f"Triton {plan.backend} backend")
    settings = ", ".join([f"{k}={v}" for k, v in plan.parameters.items()
                          if not k.startswith(("preprocessing.", "tome_export."))]
                         + ([f"optimization.graph.level={plan.graph_level}"] if plan.graph_level is not None else []))
    lines = [f"# {plan.name}: {title}", "",
             f"Written by tome-export {__version__} from `{os.path.abspath(artifact)}` ({model.get('source', 'timm')} "
             f"{manifest.upstream_name}, weights {model.get('weights')}). Validated when built: {validation_line(manifest)}.",
             "", "## Serve", "", *_server_lines(plan, manifest, repository),
             "", "## Inputs and outputs", "", *_io_lines(plan, manifest.task.name),
             "", "## Preprocessing (the client's job)", "", *_preprocessing_lines(manifest),
             "", "## Client", "", *_client_lines(plan),
             "", "## Settings", "",
             f"- validated runtime settings (the manifest's `runtime`): {_runtime_settings(manifest)}; "
             + ("`tome_export.runtime` applies them" if plan.variant == "python" else
                "carried into the backend settings below" + (", except what the notes name" if plan.notes else "")),
             f"- backend settings in config.pbtxt: {settings or 'none (the backend defaults)'}; the recipe fixes no "
             f"thread count, so threads are the backend's default unless `--threads` was given",
             *[f"- **note**: {note}" for note in plan.notes],
             "", "## Limits", "", *LIMITS,
             "", "## Files", "",
             "`SHA256SUMS` in this directory lists every file's sha256: `sha256sum -c SHA256SUMS` checks them.",
             "", "## Tested", "", TESTED, ""]
    return "\n".join(lines)
