import subprocess
import sys

import pytest

from tome_export.errors import UserError
from tome_export.recipe import builtin_recipes, load_recipe, parse_recipe
from tome_export.targets import recipe_settings, targets


def test_every_builtin_recipe_validates():
    recipes = builtin_recipes()
    assert ("onnx", "fp32") in recipes
    for (target, precision), path in recipes.items():
        recipe = load_recipe(path)
        assert (recipe.target, recipe.precision) == (target, precision)
        assert path.name == f"{target}-{precision}.yaml"
        recipe_settings(recipe)  # every section key is one its target takes


def test_every_target_precision_has_a_recipe():
    recipes = builtin_recipes()
    assert {(t.name, p) for t in targets().values() for p in t.precisions} == set(recipes)


@pytest.mark.parametrize("data,message", [
    ({"target": "onnx", "precision": "fp32", "colour": 1}, "unknown key 'colour'"),
    ({"target": "onnx", "precision": "fp32", "validation": {"max_abs_dif": 1}}, "unknown key 'max_abs_dif'"),
    ({"target": "onnx", "precision": "fp32", "validation": {"max_abs_diff": "small"}}, "expected float"),
    ({"target": "onnx", "precision": "int8"}, "precision 'int8' is not one of"),
    ({"target": "coreml", "precision": "fp32"}, "unknown target 'coreml'"),
    ({"precision": "fp32"}, "missing 'target'"),
    ({"target": "onnx", "precision": "fp32", "merge_impl": "fast"}, "choose auto, gather or onehot"),
])
def test_bad_recipes_are_rejected(data, message):
    with pytest.raises(UserError, match=message):
        recipe_settings(parse_recipe(data))


def test_unreadable_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_recipe(bad)


def test_settings_hold_the_defaults_and_the_recipe_values():
    from tome_export.recipe import recipe_for

    _, settings = recipe_settings(recipe_for("onnxruntime", "int8"))
    assert settings.quantization.method == "dynamic" and settings.calibration.images == 32
    assert settings.validation.thresholds().min_cosine == 0.99
    _, edited = recipe_settings(parse_recipe({"target": "onnxruntime", "precision": "int8"}))  # nothing set
    assert edited.quantization.method == "dynamic" and edited.build.keep_fp32 == "tome"
    _, trt = recipe_settings(parse_recipe({"target": "tensorrt", "precision": "fp16"}))
    assert trt.validation.min_cosine == 0.999 and trt.calibration.batch == 8  # precision defaults, then the type's


def test_recipes_are_package_data_and_parse_without_torch():
    code = ("import sys, tome_export.recipe as r, tome_export.schedule, tome_export.bench.config, tome_export.targets as t;"
            " t.recipe_settings(r.recipe_for('openvino', 'int8')); t.targets();"
            " assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
