import json

import pytest

from dscompress.errors import RecipeError
from dscompress.recipe import Recipe, Stage, load_recipe
from dscompress.registry import PASS_KEYS, REGISTRY

BASE = "model: {path: 'tiny:llama'}\nstages:\n  - rtn: {bits: 4}\n"


def load_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path)[0]


def error_of(tmp_path, text) -> str:
    with pytest.raises(RecipeError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults(tmp_path):
    recipe = load_text(tmp_path, BASE)
    assert recipe.stages[0].rtn.group_size == 128 and recipe.data.eval.samples == 16
    assert recipe.stages[0].label == "rtn" and recipe.model.trust_remote_code is False


def test_stage_fields_match_the_registry():
    """Every registered pass is a Stage field of its config type, and every config-typed field is registered."""
    config_fields = {
        name: field.annotation.__args__[0]
        for name, field in Stage.model_fields.items()
        if any(arg in REGISTRY for arg in getattr(field.annotation, "__args__", ()))
    }
    assert config_fields == {spec.key: config for config, spec in REGISTRY.items()}
    assert tuple(config_fields) == PASS_KEYS  # the same order: error messages list passes in it


def test_unknown_key_names_path_line_allowed_and_fix(tmp_path):
    msg = error_of(tmp_path, BASE.replace("bits: 4", "bits: 4, group_sise: 64"))
    assert "r.yaml:3: stages[0].rtn.group_sise: unknown key" in msg
    assert "allowed: exclude, bits, group_size, symmetric" in msg and "did you mean 'group_size'" in msg


def test_bad_value_lists_allowed(tmp_path):
    msg = error_of(tmp_path, BASE.replace("bits: 4", "bits: 5"))
    assert "stages[0].rtn.bits: 5 is not allowed; allowed: 2, 3, 4 or 8" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, BASE.replace("bits: 4", "symmetric: maybe"))
    assert "stages[0].rtn.symmetric: 'maybe'" in msg and "bool" in msg


def test_unknown_gate_metric(tmp_path):
    msg = error_of(tmp_path, BASE + "    gate: {bleu: {min: 0.3}}\n")
    assert "stages[0].gate.bleu: unknown gate metric 'bleu'; allowed metrics: perplexity, kl, top1" in msg


@pytest.mark.parametrize(
    ("gate", "expect"),
    [
        ("{top1: {min: 1.5}}", "stages[0].gate.top1.min: 1.5"),
        ("{kl: {max: 0}}", "stages[0].gate.kl.max: 0"),
        ("{on_fail: skip}", "a gate needs at least one of perplexity, kl, top1"),
        ("{perplexity: {max_increase_pct: -1}}", "max_increase_pct: -1"),
    ],
)
def test_impossible_gates(tmp_path, gate, expect):
    assert expect in error_of(tmp_path, BASE + f"    gate: {gate}\n")


def test_stage_needs_exactly_one_pass(tmp_path):
    msg = error_of(tmp_path, "model: {path: x}\nstages:\n  - name: a\n")
    assert "stages[0]" in msg and "exactly one pass" in msg


def test_invalid_yaml_and_duplicates_and_not_a_mapping(tmp_path):
    assert "invalid YAML" in error_of(tmp_path, "model: [unclosed\n")
    assert "r.yaml:2: model: duplicate key" in error_of(tmp_path, "model: {path: a}\nmodel: {path: b}\nstages: []\n")
    assert "a recipe is a YAML mapping" in error_of(tmp_path, "- just\n- a list\n")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_fractions_must_sum_to_one(tmp_path):
    text = BASE + "data: {fractions: {eval: 0.5, calibration: 0.5, train: 0.5}}\n"
    assert "must sum to 1" in error_of(tmp_path, text)


def test_more_errors_are_counted(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_text(tmp_path, BASE.replace("bits: 4", "bits: 5, foo: 1"))
    assert "(+1 more" in str(info.value) and len(info.value.all_messages) == 2


def test_schema_round_trips(tmp_path):
    schema = Recipe.model_json_schema()
    assert "rtn" in json.dumps(schema) and schema["additionalProperties"] is False
    recipe = load_text(tmp_path, BASE)
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe


def _schema_properties(schema: dict):
    yield "Recipe", schema
    yield from schema["$defs"].items()


def test_shipped_schema_is_current_and_describes_every_key():
    from pathlib import Path

    from dscompress.recipe import SCHEMA_FILE, recipe_schema

    shipped = json.loads((Path(__file__).resolve().parents[1] / SCHEMA_FILE).read_text())
    assert shipped == recipe_schema(), "schema/recipe.schema.json is stale: dscompress schema > " + SCHEMA_FILE
    missing = [f"{name}.{key}" for name, node in _schema_properties(shipped)
               for key, prop in (node.get("properties") or {}).items() if not prop.get("description")]  # fmt: skip
    assert not missing, missing
    assert shipped["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_encodes_one_pass_per_stage_and_a_metric_per_gate():
    from pathlib import Path

    import jsonschema
    import yaml

    from dscompress.recipe import recipe_schema

    validator = jsonschema.Draft202012Validator(recipe_schema())
    root = Path(__file__).resolve().parents[1]
    for f in sorted((root / "recipes").glob("*.yaml")):  # every shipped recipe is valid under the schema
        assert not list(validator.iter_errors(yaml.safe_load(f.read_text()))), f
    base = {"model": {"path": "tiny:llama"}}
    for bad in ([{"rtn": {}, "gptq": {}}], [{"gate": {"kl": {"max": 1}}}], [{"rtn": {}, "gate": {"on_fail": "skip"}}]):
        assert list(validator.iter_errors({**base, "stages": bad})), bad
    assert not list(validator.iter_errors({**base, "stages": [{"rtn": {}, "gate": {"kl": {"max": 1}}}]}))


def test_shipped_recipes_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "recipes").glob("*.yaml")) + sorted((root / "examples").glob("*.yaml"))
    assert files
    for f in files:
        load_recipe(f)
