"""NaN/inf steps and a full disk: the run stops or carries on as configured, and never writes a broken file."""

import errno
import logging

import pytest
import torch
from safetensors.torch import load_file

import lora_scripts.atomic as atomic
from conftest import seed_config
from lora_scripts.training.checkpoints import list_checkpoints, load_state
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import TrainingError
from lora_scripts.training.loop import fit, train
from lora_scripts.training.trainer import Trainer

RUN = dict(max_train_steps=6, save_steps=2, batch_size=2, lora_rank=4, save_precision="fp32", learning_rate=1e-3)


def _poison(monkeypatch, on_calls: set[int], gradient_only: bool = False) -> None:
    """Make the loss (or only its gradient) NaN on the given compute_loss calls (0-based)."""
    original = Trainer.compute_loss
    calls = {"n": 0}

    def compute_loss(self, batch, generator):
        loss = original(self, batch, generator)
        n, calls["n"] = calls["n"], calls["n"] + 1
        if n not in on_calls:
            return loss
        if gradient_only:  # a finite loss whose backward overflows, as fp16 does
            loss.register_hook(lambda g: g * float("nan"))
            return loss
        return loss * float("nan")

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


def test_a_nan_step_is_skipped_and_the_run_finishes(tmp_path, dataset, tiny_ckpt, monkeypatch, caplog):
    _poison(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        result = train(load_config(seed_config(tmp_path, tiny_ckpt, **RUN)))
    assert result.steps == 6 and "step 3: loss is nan; step skipped, weights unchanged" in caplog.text
    assert "learning_rate too high" in caplog.text
    weights = load_file(str(result.lora_path))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_nan_gradient_with_a_finite_loss_is_caught_too(tmp_path, dataset, tiny_ckpt, monkeypatch, caplog):
    _poison(monkeypatch, {1}, gradient_only=True)
    with caplog.at_level(logging.WARNING):
        result = train(load_config(seed_config(tmp_path, tiny_ckpt, **RUN)))
    assert "step 2: a gradient is NaN/inf; step skipped" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_file(str(result.lora_path)).values())


def test_on_nonfinite_stop_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, dataset, tiny_ckpt, monkeypatch):
    _poison(monkeypatch, {4})
    config = load_config(seed_config(tmp_path, tiny_ckpt, on_nonfinite="stop", **RUN))
    with pytest.raises(TrainingError) as err:
        train(config)
    message = str(err.value)
    assert "step 5: loss is nan (on_nonfinite: stop); stopped without saving NaN weights" in message
    assert "step-4" in message and "--resume" in message
    assert not (config.output_dir / f"{config.name}.safetensors").exists()
    (last,) = [p for p in list_checkpoints(config.output_dir) if p.name == "step-4"]
    state = load_state(last / "training_state.pt")
    assert all(torch.isfinite(v).all() for s in state["lora"].values() for v in s.values())


def test_three_nan_steps_in_a_row_stop_the_run(tmp_path, dataset, tiny_ckpt, monkeypatch):
    _poison(monkeypatch, {2, 3, 4})
    with pytest.raises(TrainingError, match="step 5: loss is nan for 3 steps in a row"):
        train(load_config(seed_config(tmp_path, tiny_ckpt, **RUN)))


def test_disk_full_mid_save_keeps_the_previous_checkpoint(tmp_path, dataset, tiny_ckpt, monkeypatch, capsys):
    """The second checkpoint's LoRA file hits a full disk half-way: clear message, step-2 intact, resume works."""
    real_save = atomic.save_file
    calls = {"n": 0}

    def save_file(state, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)  # what a write that ran out of space leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, path, metadata=metadata)

    monkeypatch.setattr(atomic, "save_file", save_file)
    config_file = seed_config(tmp_path, tiny_ckpt, **RUN)
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "error: disk full while writing" in err and "step-4" in err and "MiB free" in err
    assert "earlier checkpoints are intact" in err and "--resume" in err and "Traceback" not in err
    out = load_config(config_file).output_dir
    assert [p.name for p in list_checkpoints(out)] == ["step-2"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "checkpoints" / "step-4" / "sci_lab_lora.safetensors").exists()
    load_file(str(out / "checkpoints" / "step-2" / "sci_lab_lora.safetensors"))  # still a valid file

    monkeypatch.setattr(atomic, "save_file", real_save)  # space freed
    assert main(["train", "--config", str(config_file), "--resume"]) == 0
    assert (out / "sci_lab_lora.safetensors").is_file()


def test_with_a_grad_scaler_overflow_steps_reach_it(tmp_path, dataset, tiny_ckpt, monkeypatch):
    """fp16 on a GPU: the GradScaler must see overflowing steps (it skips them and lowers its scale); our own
    guard stepping in would keep the scale too high forever. Accelerate makes no scaler on a CPU: a real
    GradScaler for the CPU is put in its place, and the optimizer step only recorded."""
    _poison(monkeypatch, {0, 1, 2, 3}, gradient_only=True)
    trainer = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **RUN))).setup()
    steps = []
    monkeypatch.setattr(trainer.accelerator, "scaler", torch.amp.GradScaler("cpu"))
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: steps.append(1))
    batch = next(iter(trainer.loader))
    for i in range(4):
        trainer.micro_step(batch, i, 0)
        assert trainer.grads_finite
    assert len(steps) == 4


def test_without_clipping_a_nan_gradient_is_still_caught(tmp_path, dataset, tiny_ckpt, monkeypatch, caplog):
    _poison(monkeypatch, {1}, gradient_only=True)
    with caplog.at_level(logging.WARNING):
        result = train(load_config(seed_config(tmp_path, tiny_ckpt, max_grad_norm=0, **RUN)))
    assert "step 2: a gradient is NaN/inf; step skipped" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_file(str(result.lora_path)).values())


def test_a_sharded_launch_is_refused_before_anything_loads():
    """FSDP/DeepSpeed would leave the main process a shard of the weights to export (accelerate runs FSDP on GPUs
    only, so this guard is what a CPU can test): named, with the launches that work."""
    from accelerate.utils import DistributedType

    from lora_scripts.errors import ConfigError
    from lora_scripts.training.trainer import refuse_sharding

    for ok in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        refuse_sharding(ok)
    for sharded in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match=f"launched this run with {sharded.value}: sharded training is not "
                                              "supported.*--multi_gpu"):
            refuse_sharding(sharded)
