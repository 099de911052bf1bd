"""Config loading: every shipped config is valid, and mistakes name the offending key."""

from pathlib import Path

import pytest
import yaml

from steel.core.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.name == path.stem
    assert set(cfg.train.models) <= {"binary", "multilabel", "seg1", "seg2", "seg3", "seg4"}
    # Round trip: the plain form loads to the same config.
    assert config_from_dict(cfg.to_dict()) == cfg


def test_defaults_are_the_seed_architecture():
    cfg = config_from_dict({})
    assert cfg.train.classifier.encoder == "xception"
    assert cfg.train.classifier.input_size == (256, 512)
    assert cfg.train.segmenter.encoder == "efficientnetb1"
    assert cfg.data.seed == 42


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"epoch": 3}}, "train.epoch"),
        ({"trian": {}}, "trian"),
        ({"train": {"classifier": {"encodr": "x"}}}, "train.classifier.encodr"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"use_gpu": "yes"}}, "train.use_gpu"),
        ({"train": {"classifier": {"input_size": [256]}}}, "train.classifier.input_size"),
        ({"train": {"models": ["seg5"]}}, "train.models"),
        ({"train": {"num_workers": 0}}, "train.num_workers"),
        ({"score": {"tta": "diagonal"}}, "score.tta"),
        ({"score": {"format": "json"}}, "score.format"),
        ({"data": {"synth": {"images": 1.5}}}, "data.synth.images"),
        ({"data": "here"}, "data"),
        ({"train": {"epochs_by_model": {"seg5": 3}}}, "train.epochs_by_model"),
        ({"train": {"epochs_by_model": {"seg3": 0}}}, "train.epochs_by_model.seg3"),
        ({"train": {"epochs_by_model": {"seg3": "many"}}}, "train.epochs_by_model.seg3"),
        ({"train": {"epochs_by_model": [3]}}, "train.epochs_by_model"),
        ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule"),
    ],
)
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_epochs_by_model_overrides_epochs_per_model():
    cfg = config_from_dict({"train": {"epochs": 5, "epochs_by_model": {"seg3": 9}, "lr_schedule": "cosine"}})
    assert cfg.train.epochs_for("seg3") == 9 and cfg.train.epochs_for("binary") == 5
    assert cfg.train.lr_schedule == "cosine" and config_from_dict({}).train.lr_schedule == "constant"


def test_typo_suggests_the_right_key():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        config_from_dict({"train": {"epoch": 3}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    cfg = load_config(str(path), ["train.epochs=5", "train.classifier.input_size=[32, 160]", "data.synth.images=8"])
    assert cfg.train.epochs == 5
    assert cfg.train.classifier.input_size == (32, 160)
    assert cfg.data.synth.images == 8
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(str(path), ["train.epochz=5"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(str(path), ["train.epochs"])


def test_a_partial_section_keeps_that_sections_defaults():
    t = config_from_dict({"train": {"segmenter": {"per_worker_batch": 2}, "classifier": {"base_lr": 1e-4}}}).train
    assert (t.segmenter.encoder, tuple(t.segmenter.input_size), t.segmenter.per_worker_batch) == ("efficientnetb1", (256, 1600), 2)
    assert (t.classifier.encoder, tuple(t.classifier.input_size), t.classifier.base_lr) == ("xception", (256, 512), 1e-4)
