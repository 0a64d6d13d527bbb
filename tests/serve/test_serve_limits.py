"""Triton is never handed a config it cannot read: every number and name is checked before anything is written,
header text cannot leak out of its comment, and ``--force`` replaces only what tome-export wrote into a model.

Serves the 0.1.0 fixture builds (no build needed); the parser checks use Triton's own ModelConfig schema from
``tritonclient`` and skip without it (``.ci/run`` installs it).
"""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tome_export.cli import main
from tome_export.manifest import MANIFEST, load_manifest, write_manifest
from tome_export.serve import TritonOptions, serve_artifact
from tome_testing.triton_server import model_config_schema, parse_model_config

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "manifests-0.1.0"
ORT = FIXTURES / "vit_t16-tiny-onnxruntime-fp32"
needs_schema = pytest.mark.skipif(model_config_schema() is None,
                                  reason="tritonclient is not installed (its model_config_pb2 is the schema)")

OUT_OF_RANGE = {  # flag -> values Triton's ModelConfig cannot hold (or that are no thread count)
    "--max-batch-size": [2**31, 0, -1],
    "--queue-delay-us": [2**64, -1],
    "--threads": [2**31, 1025, 0, -1],
}


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory) -> Path:
    """The ONNX Runtime fixture with its batch dimension made dynamic, as a --dynamic-batch build records it."""
    import onnx

    directory = tmp_path_factory.mktemp("dynamic") / "vit_t16-dynamic"
    shutil.copytree(ORT, directory)
    model = onnx.load(str(directory / "model.onnx"))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, str(directory / "model.onnx"))
    data = json.loads((directory / MANIFEST).read_text())
    data["input"].update(shape=["batch", 3, 64, 64], dynamic_batch=True)
    write_manifest(directory, {k: v for k, v in data.items() if k not in ("format", "artifacts", "manifest_sha256")})
    return directory


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in OUT_OF_RANGE.items() for v in values])
def test_numbers_triton_cannot_hold_are_refused_before_anything_is_written(flag, value, dynamic, tmp_path, capsys):
    code = main(["serve", str(dynamic), "-o", str(tmp_path / "repo"), flag, str(value)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and flag in err and "Traceback" not in err, err
    assert "static batch" not in err and list(tmp_path.iterdir()) == []


def _artifact_named(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / "builds" / name
    shutil.copytree(ORT, directory)
    return directory


def _header_is_all_comments(config: str) -> bool:
    head = config.split("\nname: ", 1)[0]
    return all(line.startswith("#") for line in head.splitlines())


def test_a_newline_in_the_artifacts_name_stays_inside_its_comment(tmp_path):
    artifact = _artifact_named(tmp_path, "vit\nmax_batch_size: 99")
    result = serve_artifact(artifact, repository=tmp_path / "repo")
    config = (result.model_dir / "config.pbtxt").read_text()
    assert _header_is_all_comments(config) and "\nmax_batch_size: 99" not in config
    assert result.model_dir.name == "vit_max_batch_size__99"
    if model_config_schema() is not None:
        assert parse_model_config(config).max_batch_size == 0


@needs_schema
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.one_of(st.sampled_from("\n\r\t\x0b\x0c\x1c\x85\u2028\"\\#{}: "),
                              st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0")),
                    min_size=1, max_size=30).filter(lambda n: n not in (".", "..")),
       delay=st.integers(0, 2**64 - 1), threads=st.integers(1, 1024))
@example(name="vit\nmax_batch_size: 99", delay=0, threads=1)
@example(name="a\n}", delay=2**64 - 1, threads=1024)
def test_any_name_and_any_accepted_number_give_a_config_triton_parses(tmp_path_factory, name, delay, threads):
    from tome_export.serve.triton import plan_model, render_config

    root = tmp_path_factory.mktemp("named")
    artifact = _artifact_named(root, name)
    options = TritonOptions(queue_delay_us=delay, threads=threads)
    plan = plan_model(artifact, load_manifest(artifact), options)
    config = render_config(plan, [f"Written from {name}", f"NOTE: {name}"])
    parsed = parse_model_config(config)
    assert parsed.name == plan.name and parsed.parameters["threads"].string_value == str(threads)


@needs_schema
@pytest.mark.parametrize("size", [1, 2**31 - 1])
def test_the_largest_numbers_triton_holds_are_written_and_parse(size, dynamic):
    from tome_export.serve.triton import plan_model, render_config

    plan = plan_model(dynamic, load_manifest(dynamic), TritonOptions(max_batch_size=size, queue_delay_us=2**64 - 1))
    parsed = parse_model_config(render_config(plan, []))
    assert parsed.max_batch_size == size and parsed.dynamic_batching.max_queue_delay_microseconds == 2**64 - 1


def test_force_replaces_only_what_tome_export_wrote_into_the_model(tmp_path):
    repository = tmp_path / "repo"
    first = serve_artifact(ORT, repository=repository)
    (first.model_dir / "2").mkdir()
    (first.model_dir / "2" / "model.py").write_text("# the user's second version")
    (first.model_dir / "NOTES.md").write_text("mine")
    again = serve_artifact(ORT, repository=repository, force=True)
    assert (again.model_dir / "2" / "model.py").read_text() == "# the user's second version"
    assert (again.model_dir / "NOTES.md").read_text() == "mine"
    assert (again.model_dir / "config.pbtxt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
