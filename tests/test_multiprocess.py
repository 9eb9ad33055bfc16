"""Two CPU processes on gloo under accelerate train ONE synchronised run."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, TRAIN_BASES, seed_config
from lora_scripts.families.loading import base_family

# `--cpu --num_processes 2` starts one process; `--multi_gpu` + CPU mode starts two that sync over gloo.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def _env():
    return dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.slow
@pytest.mark.parametrize("base", TRAIN_BASES)
def test_two_processes_agree_on_the_weights(tmp_path, dataset, base, request):
    config = seed_config(tmp_path, request.getfixturevalue(base), epochs=2, save_precision="fp32", train_text_encoder=True,
                         learning_rate=1e-3)
    proc = subprocess.run(LAUNCH + [str(REPO / "tests" / "helpers" / "dist_train.py"), str(config), str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, m0 = _load(tmp_path / "rank0.safetensors")
    r1, m1 = _load(tmp_path / "rank1.safetensors")
    assert m0["world"] == m1["world"] == "2"
    # 8 images, batch 4 -> 2 batches per epoch, one per process: 1 optimizer step per epoch.
    assert m0["steps"] == m1["steps"] == "2"
    assert set(r0) == set(r1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().max() > 0 for k in r0 if "lora_B" in k)  # they did train
    saved, _ = _load(tmp_path / "output" / "sci_lab_lora" / "sci_lab_lora.safetensors")
    # down, up, alpha per kohya module (a fused one holds several peft layers: Flux's q/k/v), written once by the
    # main process
    family = base_family(request.getfixturevalue(base))[0]
    modules = {family.kohya_name(*k.rsplit(".lora_", 1)[0].split(".", 1)) for k in r0}
    assert len(saved) == 3 * len(modules)


@pytest.mark.slow
def test_train_py_under_accelerate_launch(tmp_path, dataset, tiny_ckpt):
    """The README's multi-GPU command, on two CPU processes; with a block swap, whose weights DDP must leave to it,
    and fp8 frozen weights, which DDP must not broadcast (gloo cannot; nor can any backend torchao's int8)."""
    config = seed_config(tmp_path, tiny_ckpt, epochs=2, gradient_checkpointing=True, offload="blocks:4",
                         base_weight_dtype="fp8")
    proc = subprocess.run(LAUNCH + [str(REPO / "train.py"), "--config", str(config)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "output" / "sci_lab_lora"
    assert (out / "sci_lab_lora.safetensors").is_file()
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.slow
def test_resume_under_two_processes_is_bit_identical(tmp_path, dataset, tiny_ckpt):
    """A 2-process run resumed (with 2 processes) from its mid-epoch checkpoint ends where the unbroken run does."""
    run = dict(batch_size=1, max_train_steps=6, save_steps=3, save_precision="fp32", lora_rank=4, learning_rate=1e-3,
               flip_aug=True, lora_dropout=0.1)
    whole = seed_config(tmp_path, tiny_ckpt, output_dir="./output/whole", **run)
    proc = subprocess.run(LAUNCH + [str(REPO / "train.py"), "--config", str(whole)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 8 images, batch 1, 2 processes: 4 steps per epoch, so step 3 is mid-epoch.
    checkpoint = tmp_path / "output" / "whole" / "checkpoints" / "step-3"
    resumed = seed_config(tmp_path, tiny_ckpt, output_dir="./output/resumed", **run)
    proc = subprocess.run(LAUNCH + [str(REPO / "train.py"), "--config", str(resumed), "--resume", str(checkpoint)],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, _ = _load(tmp_path / "output" / "whole" / "whole.safetensors")
    b, _ = _load(tmp_path / "output" / "resumed" / "resumed.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split(",")[0]) for line in (tmp_path / "output" / "resumed" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [4, 5, 6]  # written once (by the main process), starting after the checkpoint


def test_processes_wait_for_one_another_longer_than_nccls_default(tmp_path, dataset, tiny_ckpt):
    """NCCL gives up on a collective after 10 minutes by default, ending a healthy run in which the main process
    works alone that long (filling a large disk cache, drawing previews) while the others wait for it."""
    from datetime import timedelta

    from lora_scripts.config import load_config
    from lora_scripts.training.trainer import Trainer

    assert Trainer(load_config(seed_config(tmp_path, tiny_ckpt))).accelerator.init_handler.timeout >= timedelta(hours=1)
