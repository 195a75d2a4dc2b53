from pathlib import Path

import pytest

from tasks.config import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_yaml_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    assert params == Params()  # params.yaml states every default explicitly
    assert params.validate.min_contrast == 2.0
    assert params.as_dict()["validate"]["max_fail_share"] == 0.2


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("embed:\n  epoch: 3\n")
    with pytest.raises(ParamsError, match=r"embed\.epoch: unknown key"):
        load_params(p)


def test_unknown_section_is_named(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("embedd:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match=r"embedd: unknown key"):
        load_params(p)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("embed.epochs=-1", "embed.epochs"),
        ("cluster.k=1", "cluster.k"),
        ("validate.max_fail_share=1.5", "validate.max_fail_share"),
        ("standardize.lighting=sunny", "standardize.lighting"),
        ("cluster.k=many", "cluster.k"),
        ("embed.blocks={morph: 1, sift: 1}", "embed.blocks"),  # a misspelt block fails at load, not at embed
        ("embed.blocks={morph: -0.5}", "embed.blocks"),
        ("annotate.space_rule=average", "annotate.space_rule"),
        ("annotate.probe_weight=1.5", "annotate.probe_weight"),
        ("annotate.probe_weight=-0.1", "annotate.probe_weight"),
    ],
)
def test_bad_override_values_name_the_key(override, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(ROOT / "params.yaml", [override])


def test_overrides_are_typed_and_change_the_digest():
    base = load_params(ROOT / "params.yaml")
    changed = load_params(ROOT / "params.yaml", ["embed.epochs=3", "validate.formats=[PNG]"])
    assert changed.embed.epochs == 3 and changed.validate.formats == ["PNG"]
    assert changed.digest() != base.digest()
    assert load_params(ROOT / "params.yaml", [f"embed.epochs={base.embed.epochs}"]).digest() == base.digest()


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="key=value"):
        load_params(None, ["embed.epochs"])
    with pytest.raises(ParamsError, match="section"):
        load_params(None, ["epochs=3"])
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_cross_field_validation():
    with pytest.raises(ParamsError, match="min_side"):
        load_params(None, ["validate.min_side=100", "validate.max_side=50"])
