"""A model over protobuf's 2 GB limit builds: a random ViT one block deep but 4096 wide with a 15x MLP (2.3 GB of
fp32 weights) at 32 px, so the export and validation stay cheap (5 tokens).

One export is shared by the targets (the pipeline's own steps, as ``tome_testing/cpu_builds.py`` does). The targets are
``onnx`` (ONNX Runtime from the path) and ``onnxruntime`` (the optimised save, which writes its own data file):
measured peak memory 8.7 GB. The ``openvino`` target built, validated and ran this model too, but raised the
peak to 15.8 GB (OpenVINO holds the converted model and its compiled copies beside PyTorch's), too much for CI.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import onnx
import pytest

from tome_export import runtime
from tome_export.errors import UserError
from tome_export.files import sha256_file
from tome_export.images import sample_photos
from tome_export.inspection import graph_summary
from tome_export.manifest import read_manifest
from tome_export.onnx_files import data_files
from tome_export.pipeline import BuildRequest, build_into, export, prepare, prepare_model

pytestmark = pytest.mark.slow

WIDE = {"depth": 1, "embed_dim": 4096, "num_heads": 16, "mlp_ratio": 15.0}
TARGETS = ("onnx", "onnxruntime")
LIMIT = 2**31
DISK_NEEDED = 14e9  # the suite measured 11.8 GB more in use at this module's peak


@pytest.fixture(scope="module")
def big_builds(tmp_path_factory) -> Iterator[Dict[str, Path]]:
    root = tmp_path_factory.mktemp("big")
    free = shutil.disk_usage(root).free
    if free < DISK_NEEDED:  # a full disk would fail every test after this one, and pytest itself
        pytest.skip(f"needs {DISK_NEEDED / 1e9:.0f} GB of free disk (copies of 2.3 GB of weights); {free / 1e9:.1f} "
                    f"GB free")
    request = BuildRequest(model="vit_t16", weights="random", r=1, img_size=32, model_kwargs=WIDE, allow_large=True,
                           target="onnx", output=root / "unused")
    prepared = prepare(request)
    model = prepare_model(prepared, warn=lambda msg: None)
    exported = export(prepared, model, root / "export" / "model.onnx")
    builds = {}
    for target in TARGETS:
        workdir = root / target
        workdir.mkdir()
        build_into(prepare(replace(request, target=target)), model, workdir, export_from=exported)
        builds[target] = workdir
    del model
    shutil.rmtree(root / "export")
    yield builds
    shutil.rmtree(root, ignore_errors=True)  # 4.6 GB of artifacts


def test_the_export_is_a_graph_and_one_data_file_beside_it(big_builds):
    directory = big_builds["onnx"]
    graph, data = directory / "model.onnx", directory / "model.onnx.data"
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data",
                                                                 "selfcheck.npz"]
    assert data.stat().st_size > LIMIT > 100 * graph.stat().st_size
    assert data_files(graph) == [data]
    assert data.stat().st_mode == graph.stat().st_mode
    assert graph_summary(graph)["nodes"] > 0  # inspect reads the graph without the weights


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_builds_validates_and_checksums_the_weights(big_builds, target):
    directory = big_builds[target]
    manifest = read_manifest(directory)
    assert manifest["validation"]["passed"] is True
    weights = [rel for rel in manifest["artifacts"] if rel.endswith(".data")]
    assert weights, manifest["artifacts"]
    for rel in weights:
        assert manifest["artifacts"][rel]["sha256"] == sha256_file(directory / rel)
    assert sum(manifest["artifacts"][rel]["bytes"] for rel in weights) > LIMIT


def test_runtime_runs_each_target_and_they_agree(big_builds):
    logits = {}
    for target in TARGETS:
        with runtime.load(big_builds[target]) as runner:
            logits[target] = runner(runner.preprocess_batch(sample_photos(1)))
    for target in TARGETS[1:]:
        np.testing.assert_allclose(logits[target], logits["onnx"], atol=1e-3, rtol=1e-3)


def test_a_tampered_data_file_is_refused(big_builds):
    data = big_builds["onnx"] / "model.onnx.data"
    with open(data, "r+b") as f:
        f.seek(LIMIT)
        byte = f.read(1)
        f.seek(LIMIT)
        f.write(bytes([byte[0] ^ 1]))
    try:
        with pytest.raises(UserError, match="model.onnx.data"):
            runtime.load(big_builds["onnx"])
    finally:
        with open(data, "r+b") as f:
            f.seek(LIMIT)
            f.write(byte)
    onnx.load(str(big_builds["onnx"] / "model.onnx"), load_external_data=False)
