"""The task choice as data: which options each task takes, how --layer counts blocks, what a manifest records."""

from __future__ import annotations

import pytest

from tome_export.errors import UserError
from tome_export.graph_names import OUTPUT_NAME
from tome_export.tasks import TASKS, Task, as_task, flag, option_fields


def test_every_task_names_its_outputs_and_classify_keeps_logits():
    assert TASKS == ("classify", "embed", "dense", "tokens")
    assert Task().outputs == (OUTPUT_NAME,)
    assert Task("tokens").outputs == ("tokens", "token_sizes", "token_owners")
    assert len({name for t in TASKS for name in Task(t).outputs}) == 6  # no two tasks share an output name


@pytest.mark.parametrize("task,options,message", [
    ("embed", {"layer": -2}, "--layer -2 applies to --task dense or tokens, not --task embed"),
    ("dense", {"normalize": True}, "--normalize applies to --task embed, not --task dense"),
    ("tokens", {"nchw": True}, "--nchw applies to --task dense, not --task tokens"),
    ("classify", {"final_norm": False}, "--no-final-norm applies to --task dense or tokens"),
    ("dense", {"keep_prefix": True}, "--keep-prefix applies to --task tokens"),
    ("segment", {}, "unknown --task 'segment'"),
    ("tokens", {"layer": 0}, "--layer 0 is the patch embedding"),
])
def test_options_of_other_tasks_are_refused_with_the_flag_to_drop(task, options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        as_task(task, **options)


@pytest.mark.parametrize("layer,blocks,norm", [(None, 12, True), (-1, 12, True), (-2, 11, False), (1, 1, False),
                                               (12, 12, True), (-12, 1, False)])
def test_layer_counts_blocks_as_hidden_states_do(layer, blocks, norm):
    resolved = Task("tokens", layer=layer).resolved(12)
    assert (resolved.blocks_run, resolved.final_norm) == (blocks, norm)
    assert Task("tokens", layer=layer, final_norm=True).resolved(12).final_norm is True


@pytest.mark.parametrize("layer", [13, -13])
def test_a_layer_beyond_the_model_is_refused(layer):
    with pytest.raises(UserError, match="outside this model's 12 blocks"):
        Task("tokens", layer=layer).resolved(12)


def test_a_task_round_trips_through_the_manifest_and_old_manifests_classify():
    task = Task("tokens", layer=-2, keep_prefix=True).resolved(24)
    assert Task.from_dict(task.to_dict()) == task
    assert Task.from_dict(None) == Task() and Task.from_dict({"name": "embed", "added_later": 1}) == Task("embed")
    assert "output of block 23 (--layer -2), final norm off; prefix tokens kept" in task.describe()


def test_every_option_is_a_flag_of_some_task():
    assert [f.name for f in option_fields()] == ["layer", "final_norm", "keep_prefix", "normalize", "nchw"]
    assert all(set(f.metadata["tasks"]) <= set(TASKS) and f.metadata["help"] for f in option_fields())
    assert (flag("final_norm", False), flag("layer", -2), flag("normalize")) == (
        "--no-final-norm", "--layer -2", "--normalize")
