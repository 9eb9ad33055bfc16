import yaml

from conftest import make_images
from lora_scripts.cli import main
from lora_scripts.config import TrainConfig, load_config
from lora_scripts.init_config import CORE_KEYS


def test_init_writes_a_commented_yaml_that_trains_as_is(tmp_path, tiny_ckpt, capsys):
    data = tmp_path / "my_set"
    make_images(data, 60, size=(600, 800))
    out = tmp_path / "configs" / "my_set.yaml"  # not beside the data: paths must still resolve
    assert main(["init", str(data), "--base", str(tiny_ckpt), "--output", str(out)]) == 0
    text = out.read_text()
    raw = yaml.safe_load(text)
    assert list(raw)[: len(CORE_KEYS)] == list(CORE_KEYS)
    assert raw["epochs"] == 25 and raw["resolution"] == 512 and raw["batch_size"] == 4  # 1500 views / 60 images
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert " # " in line, f"no help comment: {line}"
    assert "13.6 MB" in text  # what the target presets cost
    cfg = load_config(out)  # relative paths in it resolve against the YAML's folder
    assert isinstance(cfg, TrainConfig) and cfg.train_data_dir == data
    assert main(["init", str(data), "--output", str(out)]) == 2  # never overwrites silently
    assert "already exists" in capsys.readouterr().err


def test_init_inside_the_image_folder_puts_outputs_beside_it(tmp_path, tiny_ckpt):
    data = tmp_path / "my_set"
    make_images(data, 4)
    out = data / "my_set.yaml"
    assert main(["init", str(data), "--base", str(tiny_ckpt), "--output", str(out)]) == 0
    cfg = load_config(out)  # outputs inside the dataset would be refused
    assert cfg.output_dir == tmp_path / "output" / "my_set_lora"


def test_init_vram_writes_the_settings_that_fit(tmp_path, tiny_ckpt):
    """`init --vram`: the memory ladder's settings as config lines (here on the tiny base: far below any real
    card it fits as it is; at 1 MB nothing is enough, and the file says so with everything it added)."""
    data = tmp_path / "my_set"
    make_images(data, 8, size=(64, 64))
    roomy, tight = tmp_path / "roomy.yaml", tmp_path / "tight.yaml"
    assert main(["init", str(data), "--base", str(tiny_ckpt), "--output", str(roomy), "--vram", "8"]) == 0
    assert "# Memory: estimated peak" in roomy.read_text() and "within --vram 8 as it is" in roomy.read_text()
    assert main(["init", str(data), "--base", str(tiny_ckpt), "--output", str(tight), "--vram", "0.001"]) == 0
    text = tight.read_text()
    assert "# Memory: does NOT fit even with the settings below" in text
    cfg = load_config(tight)
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "bf16" and cfg.batch_size == 1
    # the ladder's last weight step: fp8 with every block swapped (nf4 only where no swap was needed)
    assert cfg.base_weight_dtype == "fp8" and cfg.offload.startswith("blocks:") and cfg.text_encoder_weight_dtype == "fp8"
    assert cfg.optimizer == "adamw8bit"


def test_demo_runs_offline(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--set", "max_train_steps=2", "--set", "save_steps=0"]) == 0
    out = tmp_path / "output" / "neon_lab"
    assert (out / "neon_lab.safetensors").is_file() and (out / "loss.png").is_file()
    assert len(list((tmp_path / "data" / "neon_lab").glob("*.png"))) == 60
    assert (out / "contact_sheet.png").is_file() and (out / "stats.json").is_file()
