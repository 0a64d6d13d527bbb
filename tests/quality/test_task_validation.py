"""The build gate for the encoder tasks: embeddings, dense features and merged tokens are compared with PyTorch
ToMe by cosine and max-abs (tokens patch by patch, through their owners), and a tokens artifact must have PyTorch's
token count and sizes that count the patches each token holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tome_testing.models import make_model
from tome_export import patch
from tome_export.errors import ValidationError
from tome_export.images import sample_photos
from tome_export.models import preprocessing, set_task
from tome_export.quality.validate import (Thresholds, check_thresholds, check_with_near_ties, compare_features,
                                          token_figures, validate_against_torch, vectors)

LIMITS = Thresholds(max_abs_diff=1e-4, min_cosine=0.9999)


def _model(task: str, **options):
    model = patch(make_model("vit", depth=3, img_size=64), 6)
    set_task(model, task, **options)
    return model


def _exact(model):
    def infer(x):
        with torch.no_grad():
            return {n: v.numpy() for n, v in zip(model.tome_task.outputs, model.tome_outputs(torch.from_numpy(x)))}
    return infer


def test_tokens_are_compared_patch_by_patch_through_their_owners():
    tokens = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    owners = np.array([[0, 0, 2, 1], [2, 2, 2, 0]])
    got = vectors({"tokens": tokens, "token_sizes": np.ones((2, 3)), "token_owners": owners})
    assert got.shape == (2, 4, 2) and got[0, 2].tolist() == tokens[0, 2].tolist() and got[1, 3].tolist() == [6, 7]
    nchw = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    assert vectors({"features": nchw})[1, 3].tolist() == nchw[1, :, 1, 1].tolist()  # patch (1, 1), row-major


def test_feature_metrics_are_per_image_and_per_vector():
    reference = np.ones((3, 4, 2), np.float32)
    candidate = reference.copy()
    candidate[1, 2] = [1, -1]  # one patch orthogonal to the reference
    m = compare_features(reference, candidate)
    assert m["min_vector_cosine"] == pytest.approx(0.0) and m["mean_vector_cosine"] == pytest.approx(11 / 12)
    assert m["min_cosine"] == pytest.approx(1.5 / np.sqrt(2.5))  # the pooled patches: (1, 0.5) against (1, 1)
    assert m["min_image_vector_cosine"] == pytest.approx(0.75) and m["max_abs_diff"] == 2.0 and m["images"] == 3


def test_a_wrong_unmerge_keeps_the_pooled_features_and_fails_every_patch():
    """Pooling forgives a flipped match (reduced precision) and a permutation alike: fp32 recipes limit every patch."""
    reference = np.random.default_rng(1).standard_normal((2, 16, 8)).astype(np.float32)
    permuted = reference[:, ::-1]  # every patch reads another patch's features: the same mean
    m = compare_features(reference, permuted)
    assert m["min_cosine"] == pytest.approx(1.0) and m["mean_vector_cosine"] < 0.5
    with pytest.raises(ValidationError, match="max_abs_diff"):
        check_thresholds(m, Thresholds(max_abs_diff=1e-4), "permuted")


def test_tokens_of_images_that_merged_as_pytorch_did_are_limited_one_by_one():
    rng = np.random.default_rng(2)
    reference = {"tokens": rng.standard_normal((2, 2, 4)), "token_sizes": np.array([[3, 1], [2, 2]]),
                 "token_owners": np.array([[0, 0, 0, 1], [0, 1, 0, 1]])}
    flipped = {**reference, "token_sizes": np.array([[3, 1], [1, 3]]), "token_owners": np.array([[0, 0, 0, 1], [0, 1, 1, 1]])}
    flipped["tokens"] = reference["tokens"].copy()
    flipped["tokens"][0, 1] *= -1  # image 0 merged as PyTorch did, and its second token is wrong
    figures = token_figures(reference, flipped, "test")
    assert figures["token_sizes_identical"] == 0.5 and figures["aligned_token_cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValidationError, match="aligned_token_cosine"):
        check_thresholds({"min_cosine": 1.0, "images": 2, **figures}, Thresholds(min_cosine=0.99), "test")


def test_sizes_that_do_not_count_the_owned_patches_fail():
    outputs = {"tokens": np.ones((1, 2, 4)), "token_sizes": np.array([[3, 1]]), "token_owners": np.array([[0, 0, 0, 1]])}
    assert token_figures(outputs, outputs, "ok") == {"tokens": 2, "patches": 4, "token_sizes_identical": 1.0,
                                                     "aligned_token_cosine": pytest.approx(1.0)}
    with pytest.raises(ValidationError, match="do not count"):
        token_figures(outputs, {**outputs, "token_sizes": np.array([[2, 2]])}, "bad sizes")
    with pytest.raises(ValidationError, match="token_owners has shape"):
        token_figures(outputs, {**outputs, "token_owners": np.zeros((1, 5), np.int64)}, "bad count")


@pytest.mark.parametrize("task,options", [("embed", {}), ("dense", {"nchw": True}), ("tokens", {"layer": -2})])
def test_the_gate_passes_an_exact_artifact_and_fails_a_wrong_one(task, options):
    model = _model(task, **options)
    batches = [preprocessing(model).batch(sample_photos(4))]
    exact = _exact(model)
    result = validate_against_torch(model, exact, batches, LIMITS, "exact")
    assert result["passed"] and result["images"] == 4 and result["min_cosine"] > 0.99999
    assert "top1_agreement" not in result  # no classes to agree on
    if task == "tokens":
        assert result["token_sizes_identical"] == 1.0 and result["patches"] == 16
    first = model.tome_task.outputs[0]
    wrong = lambda x: {**exact(x), first: exact(x)[first] + np.float32(0.01)}  # noqa: E731
    with pytest.raises(ValidationError, match="max_abs_diff"):
        validate_against_torch(model, wrong, batches, LIMITS, "wrong")


def test_a_near_tie_flip_of_one_image_is_excused_for_features_too():
    reference = np.random.default_rng(0).standard_normal((6, 16, 8)).astype(np.float32)
    candidate = reference.copy()
    candidate[2, :5] = candidate[2, 5:10]  # patches of one image now read other tokens
    margins = np.full(6, 0.05)
    margins[2] = 0.0
    result = check_with_near_ties(reference, candidate, margins, LIMITS, "test")
    assert result["near_tie_images"] == [2] and result["images"] == 5
    with pytest.raises(ValidationError):
        check_with_near_ties(reference, candidate, np.full(6, 0.05), LIMITS, "test")
