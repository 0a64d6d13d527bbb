"""Validation inputs: distinct, deterministic views of the bundled photos, and the confidence of top-1 agreement."""

import numpy as np
import pytest

from tome_export.errors import UserError, ValidationError
from tome_export.images import MAX_VIEWS, SAMPLE_PHOTOS, VIEWS, sample_photos, sample_views, view_names
from tome_export.preprocess import Preprocessing
from tome_export.quality.validate import (DEFAULT_IMAGES, Z95, Thresholds, check_thresholds, check_with_near_ties,
                                          compare_logits, input_ids, validation_batches, wilson_interval)

from tome_testing.cpu_builds import plan_with

PRE = Preprocessing((3, 64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875, "center", "bicubic")


def test_views_are_distinct_inputs_after_preprocessing():
    arrays = PRE.batch(sample_views(MAX_VIEWS))
    assert MAX_VIEWS == len(SAMPLE_PHOTOS) * len(VIEWS) and len(arrays) == MAX_VIEWS
    assert len({a.tobytes() for a in arrays}) == MAX_VIEWS
    flat = arrays.reshape(MAX_VIEWS, -1).astype(np.float64)
    gaps = np.abs(flat[:, None] - flat[None]).mean(-1) + np.eye(MAX_VIEWS)
    assert gaps.min() > 0.01  # not merely a bit apart: every pair differs visibly


def test_views_are_the_same_bytes_every_call_and_start_with_the_photos():
    first, again = sample_views(MAX_VIEWS), sample_views(MAX_VIEWS)
    assert all(a.tobytes() == b.tobytes() and a.size == b.size for a, b in zip(first, again))
    assert all(a.tobytes() == p.tobytes() for a, p in zip(first, sample_photos()))
    assert [im.tobytes() for im in sample_views(12)] == [im.tobytes() for im in first[:12]]
    assert view_names(9) == [f"{p} photo" for p in SAMPLE_PHOTOS] + [f"{SAMPLE_PHOTOS[0]} mirror"]


@pytest.mark.parametrize("n", [0, MAX_VIEWS + 1])
def test_more_views_than_exist_are_refused(n):
    with pytest.raises(ValueError, match=f"1 to {MAX_VIEWS} distinct views"):
        sample_views(n)


@pytest.mark.parametrize("batch,dynamic,images", [(1, False, 32), (5, False, 32), (8, True, 32), (4, True, 6),
                                                  (1, True, 20)])
def test_batches_cover_every_view_once_as_a_distinct_input(batch, dynamic, images):
    batches = validation_batches(PRE, batch, dynamic, images)
    ids = input_ids(batches)
    assert ids.max() + 1 == images and len(ids) == sum(len(b) for b in batches)
    sizes = {len(b) for b in batches}
    assert sizes == ({1, 3, batch} if dynamic else {batch})
    if dynamic:  # the extra batch sizes run one view per photo, not every view
        extra = [b for b in batches if len(b) != batch]
        assert len({row.tobytes() for b in extra for row in b}) == min(images, len(SAMPLE_PHOTOS))


def test_the_default_makes_one_flip_a_small_step():
    assert DEFAULT_IMAGES == 32 and 1 / DEFAULT_IMAGES < 0.05


def test_wilson_interval_closed_forms():
    z2 = Z95 ** 2
    for n in (1, 8, 32, 100):
        assert wilson_interval(n, n) == pytest.approx((n / (n + z2), 1.0))
        assert wilson_interval(0, n) == pytest.approx((0.0, z2 / (n + z2)))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(8, 8)[0] == pytest.approx(0.6756, abs=1e-4)


@pytest.mark.parametrize("k,n", [(6, 8), (24, 32), (31, 32), (1, 3), (50, 100)])
def test_wilson_interval_ends_are_where_the_score_test_is_on_the_edge(k, n):
    """The Wilson interval is every p with |k/n - p| <= z sqrt(p (1 - p) / n): both ends satisfy it with
    equality, and the interval is the mirror image of that of n - k."""
    low, high = wilson_interval(k, n)
    assert low < k / n < high
    for p in (low, high):
        assert (k / n - p) ** 2 == pytest.approx(Z95 ** 2 * p * (1 - p) / n, rel=1e-9)
    mirrored = wilson_interval(n - k, n)
    assert (1 - high, 1 - low) == pytest.approx(mirrored)
    assert (high - low) > (np.subtract(*wilson_interval(4 * k, 4 * n)[::-1]))  # more images, narrower


def test_agreement_counts_distinct_inputs_and_carries_the_interval():
    reference = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    candidate = reference.copy()
    candidate[5] = np.eye(4)[2]  # row 5 is input 1 again, run at another batch size: it flips there
    metrics = compare_logits(reference, candidate, np.array([0, 1, 2, 3, 0, 1]))
    assert metrics["images"] == 4 and metrics["runs"] == 6 and metrics["top1_agreement"] == 0.75
    assert metrics["top1_interval_95"] == [round(v, 4) for v in wilson_interval(3, 4)]
    plain = compare_logits(reference, candidate)
    assert plain["images"] == 6 and "runs" not in plain and plain["top1_agreement"] == pytest.approx(5 / 6)


def test_a_failure_names_the_images_and_the_interval():
    reference = np.eye(4)[np.arange(32) % 4]
    candidate = reference.copy()
    candidate[:9] = np.roll(candidate[:9], 1, axis=1)
    with pytest.raises(ValidationError) as failure:
        check_thresholds(compare_logits(reference, candidate), Thresholds(min_top1_agreement=0.75), "test")
    low, high = wilson_interval(23, 32)
    assert f"on 32 images (top-1 agreement 0.719, 95% interval {low:.3f}-{high:.3f})" in str(failure.value)


def test_near_tie_gate_counts_distinct_inputs():
    reference = np.eye(4)[np.arange(10) % 4]
    candidate = reference.copy()
    candidate[[2, 7]] = np.roll(candidate[[2, 7]], 1, axis=1)  # rows 2 and 7 are the same near-tie input
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 2, 8, 9])
    margins = np.where(ids == 2, 1e-6, 0.5)
    result = check_with_near_ties(reference, candidate, margins, Thresholds(min_top1_agreement=1.0), "test",
                                  image_ids=ids)
    assert result["passed"] and result["near_tie_images"] == [2, 7] and result["images"] == 8
    assert result["all_images"]["images"] == 9 and result["all_images"]["top1_agreement"] == pytest.approx(8 / 9)


def test_a_recipe_asking_for_more_views_than_exist_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match=f"validation.images is {MAX_VIEWS + 1}: .* at most {MAX_VIEWS}"):
        plan_with(tmp_path, "onnx", "fp32", validation={"images": MAX_VIEWS + 1})
