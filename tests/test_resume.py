"""A crash, a kill or Ctrl-C costs nothing: resume continues exactly, and no run is overwritten by accident."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TRAIN_BASES, seed_config
from lora_scripts.training.checkpoints import list_checkpoints
from lora_scripts.config import load_config
from lora_scripts.errors import OutputDirError
from lora_scripts.training.loop import train

# Everything random in a step is exercised: LoRA dropout, flips, random crops, caption shuffle and dropout.
RUN = dict(max_train_steps=24, save_steps=3, save_precision="fp32", batch_size=2, lora_rank=4, lora_dropout=0.2,
           flip_aug=True, random_crop=True, shuffle_caption=True, caption_dropout=0.2, learning_rate=1e-3,
           train_text_encoder=True)


def _start(config, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("base", TRAIN_BASES)
def test_sigkill_then_resume_is_bit_identical(tmp_path, dataset, base, request):
    tiny_ckpt = request.getfixturevalue(base)
    ref_cfg = load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./output/reference", **RUN))
    reference = load_file(str(train(ref_cfg).lora_path))

    config = seed_config(tmp_path, tiny_ckpt, output_dir="./output/killed", **RUN)
    out = tmp_path / "output" / "killed"
    proc = _start(config)
    _wait_for(out / "checkpoints" / "step-3" / "training_state.pt", proc)
    time.sleep(random.uniform(0.0, 1.0))  # somewhere after the first checkpoint, mid-step or mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "killed.safetensors").exists()
    assert all(p.suffix != ".tmp" for p in (out / "checkpoints").rglob("*") if p.is_file() and list_checkpoints(out))

    resumed = _start(config, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    got = load_file(str(out / "killed.safetensors"))
    assert set(got) == set(reference)
    assert all(torch.equal(got[k], reference[k]) for k in reference), "resumed run differs from the unbroken one"
    steps = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 25))  # every step logged once, none repeated after the resume


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, dataset, tiny_ckpt):
    config = seed_config(tmp_path, tiny_ckpt, **dict(RUN, save_steps=100, max_train_steps=40))
    out = tmp_path / "output" / "sci_lab_lora"
    proc = _start(config)
    _wait_for(out / "loss.csv", proc)
    while len((out / "loss.csv").read_text().splitlines()) < 3:  # a couple of steps in
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    (checkpoint,) = list_checkpoints(out)
    resumed = _start(config, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert (out / "sci_lab_lora.safetensors").is_file() and int(checkpoint.name.split("-")[1]) < 40


def test_never_overwrites_another_run(tmp_path, dataset, tiny_ckpt):
    first = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=2))
    train(first)
    changed = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=2, lora_rank=8))
    before = (first.output_dir / "sci_lab_lora.safetensors").read_bytes()
    with pytest.raises(OutputDirError) as err:
        train(changed)
    text = str(err.value)
    assert "already holds another run" in text and "lora_rank: 16 -> 8" in text and "--overwrite" in text
    assert (first.output_dir / "sci_lab_lora.safetensors").read_bytes() == before  # nothing touched
    with pytest.raises(OutputDirError, match="same config"):
        train(first)
    assert train(changed, overwrite=True).steps == 2


def test_templated_output_dir_gives_one_folder_per_version(tmp_path, dataset, tiny_ckpt):
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./output/sci_lab_r{lora_rank}_e{epochs}"))
    assert cfg.output_dir == tmp_path / "output" / "sci_lab_r16_e15" and cfg.name == "sci_lab_r16_e15"


def test_save_last_n_bounds_disk_use(tmp_path, dataset, tiny_ckpt):
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=8, save_steps=2, save_last_n=2))
    train(cfg)
    assert [p.name for p in list_checkpoints(cfg.output_dir)] == ["step-4", "step-6"]


def test_a_resume_that_sees_fewer_gpus_than_the_save_restores_what_it_can(monkeypatch):
    """A checkpoint holds a CUDA RNG state per GPU its process saw; resumed on a machine (or under
    CUDA_VISIBLE_DEVICES) with fewer, torch.cuda.set_rng_state_all would fail on the first missing device."""
    from lora_scripts.training.checkpoints import restore_rng, rng_states

    states = {**rng_states(), "cuda": [torch.zeros(4, dtype=torch.uint8) + i for i in range(4)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    restore_rng(states)
    assert restored == [(0, 0), (1, 1)]
