"""An edited artifact never loads: the manifest's digest is required, its content is checked against the schema
(types, ranges, known dtypes) when read, and a manifest from a newer tome-export is reported. Every reader
(runtime.load, inspect, serve, engine) answers a bad manifest with one line and exit 2, never a traceback.

Artifacts are copies of the 0.1.0 fixture builds, edited as a user (or an attacker) would, digest recomputed
unless the case is about the digest.
"""

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.manifest import MANIFEST, SELF_DIGEST, Manifest, _self_digest, read_manifest
from tome_export.runtime import load

FIXTURES = Path(__file__).parent / "fixtures" / "manifests-0.1.0"
ORT = FIXTURES / "vit_t16-tiny-onnxruntime-fp32"
READERS = {"inspect": lambda d: ["inspect", str(d)], "serve": lambda d: ["serve", str(d), "-o", str(d.parent / "r")],
           "engine": lambda d: ["engine", str(d)]}


def _edited(tmp_path: Path, edit, redigest: bool = True, source: Path = ORT) -> Path:
    directory = tmp_path / "artifact"
    shutil.copytree(source, directory)
    data = json.loads((directory / MANIFEST).read_text())
    edit(data)
    if redigest:
        data[SELF_DIGEST] = _self_digest(data)
    (directory / MANIFEST).write_text(json.dumps(data))
    return directory


def _one_line(capsys, argv, code=2):
    got = main(argv)
    out, err = capsys.readouterr()
    assert got == code and err.count("\n") == 1 and "Traceback" not in err, (got, err)
    return out, err


# --- the digest -------------------------------------------------------------------------------------------------


def _digest_removed_and_shape_edited(data):
    del data[SELF_DIGEST]
    data["input"]["shape"] = [1, 3, 96, 96]


def test_a_manifest_without_its_digest_is_an_edited_manifest(tmp_path, capsys):
    directory = _edited(tmp_path, _digest_removed_and_shape_edited, redigest=False)
    with pytest.raises(UserError, match=f"has no {SELF_DIGEST}"):
        load(directory)
    out, err = _one_line(capsys, ["inspect", str(directory)], code=1)
    assert "checksums  FAILED (manifest.json was edited)" in out and "checksums  ok" not in out
    _, err = _one_line(capsys, READERS["serve"](directory))
    assert f"has no {SELF_DIGEST}" in err and not (tmp_path / "r").exists()


def test_the_fixtures_carry_their_digest_so_they_load_because_it_verifies():
    for build in FIXTURES.iterdir():
        data = json.loads((build / MANIFEST).read_text())
        assert data["tool_version"] == "0.1.0" and data[SELF_DIGEST] == _self_digest(data)
        read_manifest(build)


# --- the schema -------------------------------------------------------------------------------------------------

CASES = {  # the cases, then more of the same kind
    "string where an object belongs": (lambda d: d.update(input="images"), "'input' is str"),
    "a list for validation": (lambda d: d.update(validation=[0.99]), "'validation' is list"),
    "an unknown dtype": (lambda d: d["input"].update(dtype="float33"), "'dtype' is one of float32"),
    "a shape of strings": (lambda d: d["input"].update(shape=["1", "3", "64", "64"]), "'shape' is [batch"),
    "a zero batch": (lambda d: d["input"].update(shape=[0, 3, 64, 64]), "'shape' is [batch"),
    "a gigapixel input": (lambda d: d["input"].update(shape=[1, 3, 10**6, 10**6]), "'shape' is [batch"),
    "a crop that resizes to gigapixels": (lambda d: d["preprocessing"].update(crop_pct=1e-9), "'crop_pct'"),
    "NaN in the preprocessing": (lambda d: d["preprocessing"].update(mean=[float("nan")] * 3), "'mean'"),
    "a zero std": (lambda d: d["preprocessing"].update(std=[0, 1, 1]), "'std'"),
    "an unknown interpolation": (lambda d: d["preprocessing"].update(interpolation="sinc"), "'interpolation'"),
    "an artifact without a sha256": (lambda d: d["artifacts"].update({"model.onnx": {"bytes": 1}}), "model.onnx"),
    "an artifact entry that is a string": (lambda d: d["artifacts"].update({"model.onnx": "ok"}), "model.onnx"),
    "negative bytes": (lambda d: d["artifacts"]["model.onnx"].update(bytes=-1), "model.onnx"),
    "thresholds as text": (lambda d: d["validation"].update(thresholds={"min_cosine": "high"}), "'thresholds'"),
    "notes as one string": (lambda d: d.update(notes="rebuilt"), "'notes' is str"),
    "a note with a line break": (lambda d: d.update(notes=["ok\nFAKE LINE"]), "'notes'"),
    "a boolean r schedule": (lambda d: d.update(r_schedule=[True, False]), "'r_schedule'"),
    "a profile of text": (lambda d: d.update(tensorrt={"profile": {"min": "1", "opt": 8, "max": 8}}), "'tensorrt'"),
    "no target": (lambda d: d.pop("target"), "no 'target'"),
    "runtime as a list": (lambda d: d.update(runtime=["model.onnx"]), "'runtime' is list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_manifest_that_does_not_fit_the_schema_is_one_line_in_every_reader(case, tmp_path, capsys):
    edit, fragment = CASES[case]
    directory = _edited(tmp_path, edit)
    for verify in (True, False):
        with pytest.raises(UserError, match="does not fit the manifest schema") as err:
            load(directory, verify=verify)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    for reader, argv in READERS.items():
        _, err = _one_line(capsys, argv(directory))
        assert "does not fit the manifest schema" in err, (reader, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # serve wrote nothing


WRONG = ["text", 7, -1, 2.5, True, None, [], {}, [1, "a"], {"a": 1}, float("nan")]


def _mutations(data):
    """Every top-level and second-level field of a manifest replaced by each value of WRONG."""
    for key, value in data.items():
        if key in (SELF_DIGEST, "format"):
            continue
        for wrong in WRONG:
            yield (key,), wrong
        if isinstance(value, dict):
            for sub in value:
                for wrong in WRONG:
                    yield (key, sub), wrong


def test_every_mutation_is_refused_by_the_schema_or_read_without_a_traceback(tmp_path):
    """Whatever a mutated manifest holds, either the schema refuses it or the readers' code paths run on it: the
    typed manifest, the runner's inputs, inspect's text and serve's plan (a UserError is fine, nothing else)."""
    from tome_export.inspection import manifest_lines
    from tome_export.manifest_schema import schema_problem
    from tome_export.runtime import runtime_settings
    from tome_export.runtime.base import ArtifactIO
    from tome_export.serve.triton import TritonOptions, plan_model

    base = json.loads((ORT / MANIFEST).read_text())
    accepted = refused = 0
    for path, wrong in _mutations(base):
        data = copy.deepcopy(base)
        holder = data[path[0]] if len(path) == 2 else data
        holder[path[-1]] = wrong
        if schema_problem(data) is not None:
            refused += 1
            continue
        accepted += 1
        try:
            manifest = Manifest.from_dict(data)
            ArtifactIO.from_manifest(ORT, manifest, runtime_settings(manifest))
            manifest_lines(manifest)
            plan_model(ORT, manifest, TritonOptions())
        except UserError:
            pass
        except Exception as exc:  # the failure this test exists to find
            pytest.fail(f"{'.'.join(path)} = {wrong!r} passed the schema, then {type(exc).__name__}: {exc}")
    assert refused > 400 and accepted > 50, (refused, accepted)


def test_a_manifest_that_is_not_json_shaped_like_one_is_one_line(tmp_path):
    directory = tmp_path / "artifact"
    shutil.copytree(ORT, directory)
    (directory / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)  # nesting deeper than the parser's stack
    with pytest.raises(UserError, match="not valid JSON"):
        load(directory)
    with open(directory / MANIFEST, "wb") as f:  # 200 MB, sparse: refused before it is read
        f.truncate(200 << 20)
    with pytest.raises(UserError, match="larger than any manifest"):
        load(directory)


# --- newer versions -------------------------------------------------------------------------------------------


def _from_the_future(data):
    data["tool_version"] = "9.1.0"
    data["reference_outputs"] = {"file": "reference.npz"}
    data["input"]["layout"] = "NCHW"


def test_a_manifest_from_a_newer_tome_export_is_reported_with_the_fields_it_added(tmp_path, capsys):
    directory = _edited(tmp_path, _from_the_future)
    with pytest.warns(UserWarning, match=r"written by tome-export 9\.1\.0, newer than this .*reference_outputs"):
        load(directory).close()
    assert main(["inspect", str(directory)]) == 0
    out, err = capsys.readouterr()
    assert "version    the artifact was written by tome-export 9.1.0" in out and "reference_outputs" in out
    assert main(READERS["serve"](directory)) == 0
    _, err = capsys.readouterr()
    assert err.count("tome-export: warning: the artifact was written by tome-export 9.1.0") == 1, err


def test_fields_added_by_this_version_are_accepted_silently(tmp_path):
    directory = _edited(tmp_path, lambda d: d.update(reference_outputs={"file": "reference.npz"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(directory).close()
