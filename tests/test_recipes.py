import pytest

from tome_export.errors import UserError
from tome_export.recipes import builtin_recipes, load_recipe, parse_recipe


def test_every_builtin_recipe_validates():
    recipes = builtin_recipes()
    assert ("onnx", "fp32") in recipes
    for (target, precision), path in recipes.items():
        recipe = load_recipe(path)
        assert (recipe.target, recipe.precision) == (target, precision)
        assert path.name == f"{target}-{precision}.yaml"


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
        parse_recipe(data)


def test_unreadable_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_recipe(bad)
