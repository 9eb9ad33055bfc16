"""The user's workflow, as a subprocess: `python train.py --config sci_lab.yaml`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from conftest import REPO, seed_config
from lora_scripts.formats.kohya import kohya_module_name
from lora_scripts.hashes import sshs_hashes
from lora_scripts.families import FAMILIES
from lora_scripts.families.tiny import build_tiny_models


def _run(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_seed_yaml_trains_through_train_py(tmp_path, dataset, tiny_ckpt):
    config = seed_config(tmp_path, tiny_ckpt)
    proc = _run([sys.executable, str(REPO / "train.py"), "--config", str(config)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output" / "sci_lab_lora"
    lora = out / "sci_lab_lora.safetensors"
    assert lora.is_file() and (out / "loss.png").is_file() and (out / "config.yaml").is_file()
    assert (out / "checkpoints").is_dir() is False  # 30 steps < save_steps=100: no intermediate checkpoint
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 30  # 8 images / batch 4 * 15 epochs
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").iterdir())
    assert "it/s" in proc.stderr or "step/s" in proc.stderr or "s/step" in proc.stderr  # progress bar with speed

    with safe_open(str(lora), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unet, *_ = build_tiny_models()
    modules = [kohya_module_name("unet", m) for m in FAMILIES["sd15"].target_modules("unet", unet, "kohya")]
    assert keys == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(v.dtype == torch.float16 for v in tensors.values())  # save_precision fp16 by default
    assert {float(tensors[f"{m}.alpha"]) for m in modules} == {16.0} and meta["ss_network_alpha"] == "16.0"
    assert meta["ss_network_dim"] == "16" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "sci_lab_lora" and meta["ss_steps"] == "30" and meta["ss_epoch"] == "15"
    assert meta["ss_num_train_images"] == "8" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    tags = json.loads(meta["ss_tag_frequency"])["sci_lab_train"]
    assert tags["neon lighting"] == 8 and tags["digital art"] == 8
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, meta)
    assert float(meta["ss_training_started_at"]) > 0 and len(meta["ss_new_sd_model_hash"]) == 64


def test_console_script_and_set_overrides(tmp_path, dataset, tiny_ckpt):
    config = seed_config(tmp_path, tiny_ckpt)
    exe = Path(sys.executable).with_name("lora-scripts")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_scripts.cli"]
    proc = _run(cmd + ["train", "--config", str(config), "--set", "max_train_steps=3", "--set", "output_name=custom",
                       "--set", "save_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "output" / "sci_lab_lora"
    assert (out / "custom.safetensors").is_file()
    assert (out / "checkpoints" / "step-2" / "custom.safetensors").is_file()


def test_config_error_exits_2_with_message(tmp_path, dataset, tiny_ckpt):
    config = seed_config(tmp_path, tiny_ckpt, lora_rnak=4)
    proc = _run([sys.executable, str(REPO / "train.py"), "--config", str(config)], cwd=REPO)
    assert proc.returncode == 2
    assert "Did you mean 'lora_rank'?" in proc.stderr and "Traceback" not in proc.stderr
