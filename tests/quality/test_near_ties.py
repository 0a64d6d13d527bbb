"""The validation gate tells a near-tie flip from a wrong graph: an image whose merge decision rests on a score
gap below what two backends' rounding can move may merge differently and still be a correct export; a graph that
is wrong on the other images still fails."""

import numpy as np
import pytest
import torch

from tome_testing.models import make_model
from tome_export import patch
from tome_export.errors import ValidationError
from tome_export.images import sample_photos
from tome_export.models import preprocessing
from tome_export.quality.decisions import matching_margins
from tome_export.quality.validate import TIE_MARGIN, Thresholds, check_with_near_ties

STRICT = Thresholds(max_abs_diff=1e-4, min_top1_agreement=1.0)


@pytest.fixture(scope="module")
def logits():
    """PyTorch logits of 8 photos, and those of the same images where image 3 merged differently (one more token
    merged in every block: another decision, computed, not invented)."""
    model = patch(make_model("vit", depth=4), 8)
    pre = preprocessing(model)
    photos = torch.from_numpy(pre.batch(sample_photos(8)))
    with torch.no_grad():
        reference = model(photos).numpy()
        flipped = patch(make_model("vit", depth=4), 9)(photos[3:4]).numpy()
    candidate = reference + np.float32(1e-6)
    candidate[3] = flipped[0]
    return reference, candidate


def test_a_flip_on_a_near_tie_image_passes_and_is_reported_apart(logits):
    reference, candidate = logits
    margins = np.full(8, 0.05)
    margins[3] = TIE_MARGIN / 10
    result = check_with_near_ties(reference, candidate, margins, STRICT, "test")
    assert result["passed"] and result["near_tie_images"] == [3] and result["images"] == 7
    assert result["all_images"]["max_abs_diff"] > 1e-4


def test_only_the_image_that_flips_is_excused_when_most_images_have_near_ties(logits):
    """Random weights give most images some decision below the margin: the images that match are still checked,
    and only the one that differs is excused."""
    reference, candidate = logits
    result = check_with_near_ties(reference, candidate, np.full(8, TIE_MARGIN / 10), STRICT, "test")
    assert result["passed"] and result["near_tie_images"] == [3] and result["images"] == 7


def test_the_same_difference_without_a_near_tie_fails(logits):
    reference, candidate = logits
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        check_with_near_ties(reference, candidate, np.full(8, 0.05), STRICT, "test")


def test_a_wrong_graph_fails_even_with_a_near_tie_image(logits):
    reference, _ = logits
    wrong = reference + np.float32(0.01)  # wrong on every image
    margins = np.full(8, 0.05)
    margins[3] = 0.0
    with pytest.raises(ValidationError, match="near-tie"):
        check_with_near_ties(reference, wrong, margins, STRICT, "test")
    with pytest.raises(ValidationError):  # ties on most images cannot excuse them
        check_with_near_ties(reference, wrong, np.zeros(8), STRICT, "test")


def test_margins_of_photos_are_positive_and_an_exact_tie_is_zero():
    model = patch(make_model("vit", depth=2), 8)
    pre = preprocessing(model)
    photos = pre.batch(sample_photos(2))
    margins = matching_margins(model, [photos])
    assert margins.shape == (2,) and (margins > 0).all() and np.isfinite(margins).all()
    with torch.no_grad():
        model.pos_embed.zero_()  # a flat image then gives every patch the same key: every decision is a tie
    flat = np.zeros((1, *pre.input_size), np.float32)
    assert matching_margins(model, [flat])[0] == 0.0


def test_the_gate_with_the_token_grouping_passes_an_exact_artifact_and_fails_a_wrong_one():
    """TensorRT's build gate compares logits and the final token grouping through the same near-tie check."""
    from tome_export.quality.validate import validate_against_torch

    model = patch(make_model("vit", depth=2), 8)
    batches = [preprocessing(model).batch(sample_photos(4))]
    limits = Thresholds(max_abs_diff=1e-4, min_top1_agreement=1.0, min_token_group_agreement=1.0)

    def exact(x):
        with torch.no_grad():
            logits, source = model.forward_with_source(torch.from_numpy(x))
        return {"logits": logits.numpy(), "source": source.numpy()}

    result = validate_against_torch(model, exact, batches, limits, "exact", with_source=True)
    assert result["passed"] and result["token_group_agreement"] == 1.0 and result["images"] == 4
    wrong = lambda x: {**exact(x), "logits": exact(x)["logits"] + np.float32(0.01)}  # noqa: E731
    with pytest.raises(ValidationError, match="max_abs_diff"):
        validate_against_torch(model, wrong, batches, limits, "wrong", with_source=True)
