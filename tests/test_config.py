"""Config schema, YAML loading, --set overrides and error messages (cnnpipe.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cnnpipe.config import (
    Config,
    ConfigError,
    config_from_dict,
    default_config_path,
    dump_config,
    load_config,
    validate_layers,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(raw: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides)
    message = str(info.value)
    # one readable message, never pydantic's multi-line dump
    assert "validation error" not in message and "errors.pydantic.dev" not in message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- shipped configs

def test_packaged_default_is_the_repository_copy():
    assert default_config_path().read_bytes() == (REPO / "configs" / "default.yaml").read_bytes()


def test_default_file_equals_schema_defaults():
    # so a config file that leaves keys out gets exactly what the default run uses
    assert load_config() == Config()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates_and_names_its_command(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("cnnpipe train" in line for line in header), f"{path.name}: header has no run command"


def test_shipped_set_is_complete():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "mnist.yaml", "cifar10.yaml", "folder.yaml"}


def test_required_keys_exist():
    cfg = Config()
    assert (cfg.data.source, cfg.data.path, cfg.model, cfg.seed) == ("shapes", None, "simple_cnn", 0)
    assert cfg.train.epochs >= 1 and cfg.train.batch_size >= 1 and cfg.optimizer.learning_rate > 0


# ---------------------------------------------------------------- errors

def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path):
    path = write(tmp_path, "train:\n  batchsize: 32\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "unknown key 'train.batchsize'" in msg and "did you mean 'train.batch_size'?" in msg


def test_unknown_top_level_key_suggests():
    msg = error_of({"optimiser": {"name": "adam"}})
    assert "unknown key 'optimiser'" in msg and "did you mean 'optimizer'?" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = error_of({"augment": {"zzz": 1}})
    assert "unknown key 'augment.zzz'" in msg and "flip, vflip, rot90, crop_padding" in msg


def test_wrong_type_names_key_value_and_expected():
    msg = error_of({"train": {"epochs": "five"}})
    assert msg == "config: train.epochs: got 'five'; expected an integer"
    assert error_of({"augment": {"flip": "yes"}}) == "config: augment.flip: got 'yes'; expected true or false"


@pytest.mark.parametrize("lr", [0, -0.1])
def test_learning_rate_must_be_positive(lr):
    assert error_of({"optimizer": {"learning_rate": lr}}) == \
        f"config: optimizer.learning_rate: got {lr!r}; expected a number > 0"


def test_batch_size_must_be_at_least_one():
    assert error_of({"train": {"batch_size": 0}}) == "config: train.batch_size: got 0; expected an integer >= 1"
    assert "train.epochs: got 0; expected an integer >= 1" in error_of({"train": {"epochs": 0}})


def test_fraction_must_be_in_unit_interval():
    assert "data.val_fraction: got 1.0; expected a number < 1" in error_of({"data": {"val_fraction": 1.0}})
    assert "data.val_fraction: got -0.1; expected a number >= 0" in error_of({"data": {"val_fraction": -0.1}})


def test_choice_lists_the_choices():
    msg = error_of({"data": {"source": "disk"}})
    assert "data.source: got 'disk'" in msg and "'store', 'folder', 'tfds' or 'shapes'" in msg


def test_several_problems_in_one_message():
    msg = error_of({"train": {"batch_size": 0, "epochs": -1}})
    assert "train.batch_size" in msg and "train.epochs" in msg


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.train.epochs = 3  # type: ignore[misc]


# ---------------------------------------------------------------- --set overrides

def test_set_overrides_nested_keys_with_yaml_values(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n")
    cfg = load_config(path, ["train.epochs=7", "optimizer.learning_rate=0.01", "data.size=[16, 24]",
                             "model=lenet5", "optimizer.grad_clip=null", "augment.flip=true"])
    assert cfg.train.epochs == 7 and cfg.optimizer.learning_rate == 0.01
    assert cfg.data.size == (16, 24) and cfg.model == "lenet5"
    assert cfg.optimizer.grad_clip is None and cfg.augment.flip is True


def test_set_creates_a_missing_section():
    cfg = config_from_dict({}, ["optimizer.name=sgd"])
    assert cfg.optimizer.name == "sgd"


def test_set_unknown_key_is_named_with_its_origin_and_a_suggestion():
    msg = error_of({}, ("train.epoch=3",))
    assert "unknown key 'train.epoch'" in msg and "--set 'train.epoch=3'" in msg
    assert "did you mean 'train.epochs'?" in msg


def test_set_out_of_range_value_names_the_override():
    msg = error_of({}, ("train.batch_size=0",))
    assert "train.batch_size: got 0 (from --set 'train.batch_size=0'); expected an integer >= 1" in msg


def test_set_without_equals_sign():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_dict({}, ["train.epochs"])


def test_set_into_a_scalar(tmp_path):
    with pytest.raises(ConfigError, match="seed is 0, not a mapping"):
        load_config(write(tmp_path, "seed: 0\n"), ["seed.value=1"])
    assert error_of({}, ("seed.value=1",)) == \
        "config: seed: got {'value': 1} (from --set 'seed.value=1'); expected an integer"


def test_set_indexes_a_layer_list():
    cfg = config_from_dict({"model": [{"type": "conv", "filters": 4}, {"type": "relu"}]}, ["model.0.filters=8"])
    assert cfg.model[0]["filters"] == 8


# ---------------------------------------------------------------- layer lists

def test_layer_list_is_filled_with_defaults():
    (conv, pool) = validate_layers([{"type": "conv", "filters": 8}, {"type": "max_pool"}])
    assert conv == {"name": None, "type": "conv", "filters": 8, "kernel": 3, "stride": 1, "padding": "same"}
    assert pool == {"name": None, "type": "max_pool", "window": 2, "stride": None}


def test_unknown_layer_type_names_index_and_suggests():
    msg = error_of({"model": [{"type": "conv", "filters": 4}, {"type": "dense", "units": 3},
                              {"type": "maxpool"}]})
    assert "model[2].type: got 'maxpool'" in msg and "did you mean 'max_pool'?" in msg


def test_unknown_layer_option_names_index_and_key():
    msg = error_of({"model": [{"type": "relu"}, {"type": "conv", "filters": 4, "kernal": 5}]})
    assert "unknown key 'model[1].kernal'" in msg and "did you mean 'model[1].kernel'?" in msg


def test_bad_layer_value_names_index_key_and_value():
    msg = error_of({"model": [{"type": "dropout", "rate": 1.5}]})
    assert "model[0].rate: got 1.5; expected a number < 1" in msg


def test_duplicate_layer_names():
    msg = error_of({"model": [{"type": "relu", "name": "a"}, {"type": "tanh", "name": "a"}]})
    assert "'a' is used more than once" in msg


def test_unknown_preset_suggests():
    msg = error_of({"model": "resnet_smal"})
    assert "model: got 'resnet_smal'" in msg and "did you mean 'resnet_small'?" in msg
    assert "did you mean 'convnext_atto'?" in error_of({"model": "convnext_ato"})


# ---------------------------------------------------------------- dump

def test_dump_round_trips(tmp_path):
    cfg = config_from_dict({"model": [{"type": "conv", "filters": 4, "kernel": [3, 5]}],
                            "train": {"epochs": 2}, "data": {"size": [16, 16]}})
    text = dump_config(cfg)
    assert yaml.safe_load(text)["train"]["epochs"] == 2
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path) == cfg


def test_the_packaged_default_lists_every_key_at_its_default():
    import yaml

    from cnnpipe.config import Config, default_config_path

    raw = yaml.safe_load(default_config_path().read_text())

    def missing(have, want, where=""):
        for key, value in want.items():
            if key not in have:
                yield where + key
            elif isinstance(value, dict) and isinstance(have[key], dict):
                yield from missing(have[key], value, f"{where}{key}.")

    assert list(missing(raw, Config().model_dump())) == []
    assert load_config(default_config_path()) == Config()


@pytest.mark.parametrize("raw, expected", [
    ({"train": {"steps_per_dispatch": 0}}, "train.steps_per_dispatch: got 0; expected 'auto' or an integer >= 1"),
    ({"train": {"steps_per_dispatch": "fast"}}, "train.steps_per_dispatch: got 'fast'; expected 'auto' or an integer"),
    ({"train": {"steps_per_dispatch": True}}, "train.steps_per_dispatch: got True; expected 'auto' or an integer"),
    ({"data": {"on_device": "yes"}}, "data.on_device: got 'yes'; expected 'auto' or true or false"),
    ({"train": {"class_weights": "x"}}, "train.class_weights: got 'x'; expected 'auto' or a mapping"),
])
def test_a_union_of_a_word_and_a_type_names_both_in_one_line(raw, expected):
    assert error_of(raw) == f"config: {expected}"
