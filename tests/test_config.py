from pathlib import Path

import pytest

from lora_scripts.config import TrainConfig, load_config
from lora_scripts.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

SEED_YAML = """\
train_data_dir: ./data/sci_lab_train
metadata_path: ./data/sci_lab_train/metadata.csv
base_model: ./models/Stable-diffusion/v1-5-pruned.safetensors
lora_rank: 16
batch_size: 4
epochs: 15
learning_rate: 2e-4
output_dir: ./output/sci_lab_lora
save_steps: 100
"""


@pytest.fixture
def seed_tree(tmp_path, dataset):
    base = tmp_path / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors"
    base.parent.mkdir(parents=True)
    base.write_bytes(b"placeholder")  # existence is all the config checks; loading is tested elsewhere
    path = tmp_path / "sci_lab.yaml"
    path.write_text(SEED_YAML)
    return path


def test_seed_yaml_loads_with_paths_relative_to_the_file(seed_tree, tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # the working directory must not matter
    cfg = load_config(seed_tree)
    assert cfg.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; it must still work
    assert cfg.train_data_dir == tmp_path / "data" / "sci_lab_train"
    assert cfg.base_model == tmp_path / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors"
    assert cfg.name == "sci_lab_lora"  # output_name defaults to the basename of output_dir
    assert cfg.alpha == 16.0  # lora_alpha defaults to the rank
    assert cfg.lora_targets == "kohya" and cfg.save_precision == "fp16"


def test_unknown_key_suggests_the_right_one(seed_tree):
    seed_tree.write_text(SEED_YAML + "lora_rnak: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree)
    assert "lora_rnak: unknown key. Did you mean 'lora_rank'?" in str(err.value)


def test_every_problem_is_reported_at_once_with_key_value_and_range(seed_tree):
    seed_tree.write_text(SEED_YAML.replace("lora_rank: 16", "lora_rank: many").replace("2e-4", "-2e-4")
                         + "epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree)
    text = str(err.value)
    assert "3 problems" in text
    assert "epocs: unknown key. Did you mean 'epochs'?" in text
    assert "lora_rank = 'many'" in text and "integer" in text
    assert "learning_rate = '-2e-4'" in text and "greater than 0" in text and "typical" in text


def test_missing_required_file_is_named(seed_tree, tmp_path):
    (tmp_path / "models" / "Stable-diffusion" / "v1-5-pruned.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        load_config(seed_tree)
    assert "base_model" in str(err.value) and "does not exist" in str(err.value)


def test_missing_required_key(tmp_path, dataset):
    path = tmp_path / "c.yaml"
    path.write_text("train_data_dir: ./data/sci_lab_train\noutput_dir: out\n")
    with pytest.raises(ConfigError, match="base_model: required key is missing"):
        load_config(path)


def test_set_overrides_are_typed(seed_tree):
    cfg = load_config(seed_tree, ["lora_rank=8", "flip_aug=true", "lora_targets=[to_q, to_v]", "output_name=x"])
    assert cfg.lora_rank == 8 and cfg.flip_aug is True and cfg.lora_targets == ["to_q", "to_v"] and cfg.name == "x"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(seed_tree, ["lora_rank"])


def test_config_is_frozen(seed_tree):
    cfg = load_config(seed_tree)
    with pytest.raises(Exception):
        cfg.lora_rank = 4


def test_every_field_is_documented():
    for name, field in TrainConfig.model_fields.items():
        assert field.description, f"{name} has no help text"


def test_example_yamls_validate(tmp_path):
    """Every shipped example parses into known keys (files they name need not exist here)."""
    import yaml

    examples = sorted((REPO / "src" / "lora_scripts" / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        raw = yaml.safe_load(path.read_text())
        unknown = set(raw) - set(TrainConfig.model_fields)
        assert not unknown, f"{path.name}: {unknown}"
        assert path.read_text().startswith("#"), f"{path.name} should open with its run command"


def test_config_reference_doc_is_up_to_date():
    from lora_scripts.config_docs import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(), "run: python -m lora_scripts.config_docs > docs/config.md"


def test_duplicate_keys_are_refused_also_on_one_line_and_merge_keys_still_work():
    import yaml

    from lora_scripts.config import _UniqueKeyLoader, parse_override

    with pytest.raises(ConfigError, match=r"prompt: set twice \(twice on line 1\)"):
        parse_override("sample_prompts=[{prompt: a, prompt: b}]")

    merged = yaml.load("base: &b {lora_rank: 4, epochs: 2}\nrun: {<<: *b, lora_rank: 8}\n", Loader=_UniqueKeyLoader)
    assert merged["run"] == {"lora_rank": 8, "epochs": 2}
