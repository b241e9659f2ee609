"""Every YAML file in configs/ loads: method recipes through visionfx.load_config, training recipes through their own
loaders; none is left unchecked. Configs reject unknown keys with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

import visionfx
from visionfx.config import config_to_dict, config_from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))


def _load(path: Path):
    if path.name.startswith("distill-"):
        from visionfx.recovery.config import load_distill_config

        return load_distill_config(path)
    if path.name == "train-easy-vqa.yaml":
        from visionfx.recovery.easy_vqa_llava import TrainVQAConfig

        return TrainVQAConfig.load(path)
    if path.name.startswith("train-"):
        from visionfx.recovery.train import TrainConfig

        return TrainConfig.load(path)
    return visionfx.load_config(path)


def test_there_are_recipes():
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_yaml_loads(path):
    cfg = _load(path)
    assert cfg is not None
    if hasattr(type(cfg), "method") and isinstance(getattr(type(cfg), "method"), str):
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: agent\nagent_nun: 49\n")
    with pytest.raises(ValueError, match="agent_num"):
        visionfx.load_config(bad)


def test_unknown_method_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match="'agent'"):
        visionfx.patch(__import__("torch").nn.Linear(2, 2), "agnet")
