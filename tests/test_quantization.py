"""Shared merge-aware quantization pieces: calibration data, protected nodes, Q/DQ exclusion, merge decisions."""

import shutil

import numpy as np
import onnx
import pytest
from PIL import Image

from tome_export import quantization as q
from tome_export.errors import UserError
from tome_export.export import tome_nodes
from tome_export.images import MAX_VIEWS, sample_photo_paths, sample_photos, sample_views
from tome_export.models import preprocessing
from tome_export.preprocess import Preprocessing, to_rgb
from tome_export.quality import calibration as cal
from tome_export.quality import decisions as d
from tome_export.quality.validate import validation_batches
from tome_export.runtime.onnxruntime import OnnxRuntimeRunner
from tome_export.targets.tensorrt.validation import graph_io

from tome_testing.cpu_builds import CPU_KIND as CPU_MODEL, CPU_R  # digits_vit (4 blocks at 32 px), r=8: the export cpu_build uses


def test_calibration_images_are_real_photos_seeded_and_augmented():
    originals = sample_photos()
    images = cal.calibration_images(len(originals) + 6, seed=3)
    assert len(images) == len(originals) + 6
    arrays = [np.asarray(im, np.float32) for im in images]
    assert all(a.ndim == 3 and a.shape[2] == 3 and a.std() > 10 for a in arrays)
    again = cal.calibration_images(len(originals) + 6, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
    other = cal.calibration_images(len(originals) + 6, seed=4)
    assert not np.array_equal(np.asarray(images[-1]), np.asarray(other[-1]))


def test_bundled_calibration_shares_no_image_with_validation():
    """Validation runs on the bundled photos and fixed views of them; calibration augments every bundled image,
    so a quantizer never sees an image it is then validated on."""
    views = {(im.size, im.tobytes()) for im in sample_views(MAX_VIEWS)}
    calibration = cal.calibration_images(64, seed=0)
    assert not any((im.size, im.tobytes()) in views for im in calibration)


def test_a_calibration_folder_starts_with_its_photos_then_augments(tmp_path):
    for path in sample_photo_paths()[:3]:
        shutil.copy(path, tmp_path / path.name)
    originals = [to_rgb(Image.open(p)) for p in sorted(tmp_path.iterdir())]
    images = cal.calibration_images(5, data_dir=tmp_path, seed=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(o)) for a, o in zip(images, originals))
    assert not any(a.size == o.size and np.array_equal(np.asarray(a), np.asarray(o))
                   for a in images[3:] for o in originals)  # crops, flips, jitter: not one of the originals


def test_calibration_batches_from_a_folder(tmp_path):
    for path in sample_photo_paths()[:2]:
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "notes.txt").write_text("not an image")
    pre = Preprocessing((3, 64, 64), (0.5,) * 3, (0.5,) * 3, 0.9, "center", "bilinear")
    batches = cal.calibration_batches(pre, 5, 2, data_dir=tmp_path, augment=False)
    assert [b.shape for b in batches] == [(2, 3, 64, 64)] * 3  # 5 rounded up to whole batches
    assert np.array_equal(batches[0][0], batches[1][0])  # without augmentation the 2 photos cycle


def test_bad_calibration_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        cal.calibration_images(4, data_dir=tmp_path / "missing")
    with pytest.raises(UserError, match="holds no images"):
        cal.calibration_images(4, data_dir=tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="is not an image PIL can read"):
        cal.calibration_images(4, data_dir=tmp_path)


@pytest.fixture(scope="module")
def export(onnx_cache):
    path, model = onnx_cache(CPU_MODEL, CPU_R, "gather")
    return path, model, onnx.load(str(path))


def test_protected_nodes_are_the_named_tome_nodes(export):
    _, _, proto = export
    nodes = tome_nodes(proto)
    assert q.protected_node_names(proto) == [n for n in (n.name for n in proto.graph.node)
                                             if n in set(nodes["match"] + nodes["merge"])]
    assert set(q.protected_node_names(proto, "match")) == set(nodes["match"])
    assert q.protected_node_names(proto, "none") == []
    with pytest.raises(UserError, match="keep_fp32 = 'all'"):
        q.protected_node_names(proto, "all")


def test_qdq_exclusion_really_happens(export, tmp_path):
    path, model, proto = export
    pre = preprocessing(model)
    calibration = cal.calibration_batches(pre, 4, 1)
    protected = q.protected_node_names(proto)
    matmuls = ("MatMul", "Gemm", "Conv")
    kept = q.quantize_qdq(path, tmp_path / "kept.onnx", calibration, exclude=protected, op_types=matmuls)
    plain = q.quantize_qdq(path, tmp_path / "plain.onnx", calibration, op_types=matmuls)
    assert q.quantized_protected_nodes(onnx.load(str(kept)), protected) == {"replaced": [], "reading_int8": []}
    touched = q.quantized_protected_nodes(onnx.load(str(plain)), protected)["reading_int8"]
    similarity = [n for n in protected if n.startswith("tome_match/") and n.split("/")[-1].startswith("node_matmul")]
    assert len(similarity) == 4 and set(similarity) <= set(touched)
    # symmetric int8: every activation zero point is 0 (what TensorRT needs)
    zero_points = [t for t in onnx.load(str(kept)).graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(not onnx.numpy_helper.to_array(t).any() for t in zero_points)


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_decisions_read_from_the_graph_equal_pytorch(onnx_cache, impl):
    path, model = onnx_cache(CPU_MODEL, CPU_R, impl)
    batches = validation_batches(preprocessing(model), 1, False, 4)
    reference = d.torch_merge_decisions(model, batches)
    assert list(reference) == [f"blocks.{i}" for i in range(4)]
    assert reference["blocks.0"].shape == (4, CPU_R, 2)
    graph = onnx.load(str(path))
    tensors = d.decision_tensors(graph)
    assert set(tensors) == set(reference) and {spec.lowering for spec in tensors.values()} == {impl}
    with OnnxRuntimeRunner(graph_io(graph), graph=graph, extra_outputs=d.decision_output_names(tensors)) as runner:
        decisions = d.artifact_merge_decisions(runner.infer, tensors, batches)
    agreement = d.merge_decision_agreement(reference, decisions)
    assert agreement["agreement"] == 1.0 and agreement["decisions"] == 4 * 4
    assert agreement["pair_agreement"] == agreement["group_agreement"] == 1.0


def test_agreement_counts_decisions_and_pairs():
    ref = {"blocks.0": np.array([[[0, 1], [2, 1]], [[1, 0], [3, 2]]]), "blocks.1": np.array([[[0, 0]], [[1, 1]]])}
    cand = {"blocks.0": np.array([[[0, 1], [2, 0]], [[1, 0], [3, 2]]]), "blocks.1": np.array([[[0, 0]], [[1, 1]]])}
    got = d.merge_decision_agreement(ref, cand)
    assert got["agreement"] == 0.75  # 3 of 4 (block, image) decisions identical
    assert got["pair_agreement"] == round(5 / 6, 4)  # 5 of the reference's 6 merged pairs kept
    # groups: block 0 image 0 merges A0 and A2 into B1 (one group), the candidate splits them (B1 <- A0, B0 <- A2);
    # the other 4 reference groups are kept
    assert got["group_agreement"] == round(4 / 5, 4)
    assert got["first_block"] == 0.5 and got["per_block"] == {"blocks.0": 0.5, "blocks.1": 1.0}
    with pytest.raises(ValueError, match="blocks differ"):
        d.merge_decision_agreement(ref, {"blocks.0": ref["blocks.0"]})
