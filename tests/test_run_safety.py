"""A run never overwrites or mixes with another, records what it really used, and reports the loss it trained on:
the output-folder lock, resume with changed settings, gradient accumulation at the end of an epoch, the user's
own config.yaml, Ctrl-C during start-up, file permissions."""

import contextlib
import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import REPO, seed_config
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import OutputDirError
from lora_scripts.training.runlock import LOCK_FILE, OutputLock
from lora_scripts.training.loop import fit, train
from lora_scripts.training.trainer import Trainer

SMALL = dict(lora_rank=4, batch_size=4, save_steps=0, verify_after_training=False)


def _cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


# --- one run per output folder ------------------------------------------------------------------------------
def test_a_run_into_a_locked_output_dir_is_refused_with_the_holder(tmp_path, dataset, tiny_ckpt):
    config = seed_config(tmp_path, tiny_ckpt, max_train_steps=1, **SMALL)
    out = tmp_path / "output" / "sci_lab_lora"
    with OutputLock(out):
        code, message = _cli("train", "--config", str(config))
        assert code == 2, message
        assert f"is in use by another run: PID {os.getpid()}" in message and "started 20" in message, message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    assert not out.exists()  # the lock made the folder and took it away again: nothing left behind
    code, message = _cli("train", "--config", str(config))
    assert code == 0, message
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


def test_the_lock_of_a_killed_run_is_free_at_once(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lora_scripts.training.runlock import OutputLock; "
                               f"OutputLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputDirError, match=f"PID {holder.pid}"):
        OutputLock(out).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    OutputLock(out).acquire().release()  # the operating system released it with the process: no stale lock


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(tmp_path, dataset, tiny_ckpt):
    """The probe's case: a second run 0.2 s after the first, with other settings. One trains, one is refused."""
    first = seed_config(tmp_path, tiny_ckpt, max_train_steps=3, **SMALL)
    second = tmp_path / "other.yaml"
    second.write_text(first.read_text().replace("lora_rank: 4", "lora_rank: 8"))
    procs = []
    for config in (first, second):
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.2)
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another run" in refused or "already holds" in refused, refused
    assert "Traceback" not in refused
    run = json.loads((tmp_path / "output" / "sci_lab_lora" / "run.json").read_text())
    winner = 4 if results[0][0] == 0 else 8
    assert run["config"]["lora_rank"] == winner
    with safe_open(str(tmp_path / "output" / "sci_lab_lora" / "sci_lab_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == str(winner)


def test_a_run_stopped_before_its_first_step_leaves_the_folder_free(tmp_path, dataset, tiny_ckpt, monkeypatch):
    config = seed_config(tmp_path, tiny_ckpt, max_train_steps=1, **SMALL)
    out = tmp_path / "output" / "sci_lab_lora"

    def ctrl_c(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "setup", ctrl_c)
        code, message = _cli("train", "--config", str(config))
    assert code == 130, message
    assert "stopped before training began; nothing was written" in message and "Traceback" not in message
    assert not out.exists()
    # A run killed after it claimed the folder but before any result: the same command simply starts.
    out.mkdir(parents=True)
    (out / "run.json").write_text('{"config_hash": "x", "config": {}}')
    code, message = _cli("train", "--config", str(config))
    assert code == 0, message


def test_the_users_own_config_yaml_in_output_dir_is_kept(tmp_path, dataset, tiny_ckpt):
    out = tmp_path / "output" / "sci_lab_lora"
    out.mkdir(parents=True)
    resolved = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=1, **SMALL)).to_yaml_dict()
    mine = "# my notes: rank 4 looked best\n" + yaml.safe_dump({k: v for k, v in resolved.items() if v is not None})
    (out / "config.yaml").write_text(mine)
    result = train(load_config(out / "config.yaml"))
    assert (out / "config.yaml").read_text() == mine
    resolved = (out / "config.resolved.yaml").read_text()
    assert resolved.startswith("# lora-scripts: the resolved config") and yaml.safe_load(resolved)["lora_rank"] == 4
    assert result.lora_path.is_file()


def test_files_follow_the_umask(tmp_path, dataset, tiny_ckpt):
    old = os.umask(0o022)
    try:
        result = train(load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=2, save_steps=1,
                                               **{k: v for k, v in SMALL.items() if k != "save_steps"})))
    finally:
        os.umask(old)
    files = [p for p in result.output_dir.rglob("*") if p.is_file()]
    assert len(files) > 5
    private = [str(p.relative_to(result.output_dir)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644]
    assert not private, private


# --- resume: what may change, and what is really used ---------------------------------------------------------
@pytest.fixture
def lrs_used(monkeypatch):
    """The learning rate of every optimizer step, as the optimizer itself holds it."""
    seen = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    yield seen
    handle.remove()


def test_resume_applies_a_changed_learning_rate_and_records_it(tmp_path, dataset, tiny_ckpt, lrs_used, caplog):
    first = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=4, learning_rate=2e-4,
                                    **{**SMALL, "save_steps": 2}))
    train(first)
    lrs_used.clear()
    changed = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=6, learning_rate=1e-3,
                                      **{**SMALL, "save_steps": 2}))
    with caplog.at_level(logging.WARNING):
        result = train(changed, resume=True)
    assert "learning_rate: 0.0002 -> 0.001" in caplog.text
    assert lrs_used == [pytest.approx(1e-3)] * 4, lrs_used  # steps 3..6, at the new rate
    out = result.output_dir
    rows = [ln.split(",") for ln in (out / "loss.csv").read_text().splitlines()[1:]]
    header = (out / "loss.csv").read_text().splitlines()[0].split(",")
    lr_col = header.index("lr")
    assert [float(r[lr_col]) for r in rows[2:]] == [pytest.approx(1e-3)] * 4
    with safe_open(str(result.lora_path), "pt") as f:
        assert float(f.metadata()["ss_learning_rate"]) == pytest.approx(1e-3)
    run = json.loads((out / "run.json").read_text())
    assert any(c.startswith("learning_rate") for c in run["changed_on_resume"])

    # A checkpoint continued in another folder says so, and lists what differs from its own config.
    caplog.clear()
    other = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=3, learning_rate=5e-4, output_dir="./output/b",
                                    **{**SMALL, "save_steps": 2}))
    with caplog.at_level(logging.WARNING):
        train(other, resume=out / "checkpoints" / "step-2")
    assert "in a new output_dir" in caplog.text and "learning_rate: 0.0002 -> 0.0005" in caplog.text

    # The LoRA's own shape cannot change: one clear message instead of 130 lines of size mismatches.
    code, message = _cli("train", "--config", str(seed_config(tmp_path, tiny_ckpt, max_train_steps=6,
                                                                **{**SMALL, "lora_rank": 8})), "--resume")
    assert code == 2 and "cannot resume" in message and "lora_rank: 4 -> 8" in message, message
    # A checkpoint from before a fixed setting existed had its default: adding it now is a change too.
    from lora_scripts.errors import OutputDirError
    from lora_scripts.training.runs import hashed_config, resume_changes

    saved = hashed_config(load_config(seed_config(tmp_path, tiny_ckpt, **SMALL)))
    del saved["block_lr"]
    with pytest.raises(OutputDirError, match=r"block_lr: \{\} -> \{'unet.down': 0.5\}"):
        resume_changes(saved, load_config(seed_config(tmp_path, tiny_ckpt, block_lr={"unet.down": 0.5}, **SMALL)))


# --- gradient accumulation ------------------------------------------------------------------------------------
def _grads_and_losses(tmp_path, tiny_ckpt, name, accumulation):
    config = load_config(seed_config(tmp_path, tiny_ckpt, output_dir=f"./output/{name}", max_train_steps=2,
                                     gradient_accumulation_steps=accumulation, max_grad_norm=0, **SMALL))
    trainer = Trainer(config).setup()
    grads = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    result = fit(trainer)
    return grads, result.losses


def test_a_short_last_accumulation_is_a_mean_over_the_batches_it_has(tmp_path, dataset, tiny_ckpt):
    """8 images in batches of 4 = 2 batches per epoch. Accumulating 4 can only gather those 2 before the epoch
    ends: that step must equal accumulating exactly 2 (same batches, same noise), in its loss and its gradient,
    not be half of it."""
    grads2, losses2 = _grads_and_losses(tmp_path, tiny_ckpt, "acc2", 2)
    grads4, losses4 = _grads_and_losses(tmp_path, tiny_ckpt, "acc4", 4)
    assert losses4 == pytest.approx(losses2, rel=1e-5)
    assert len(grads4) == len(grads2) == 2
    for step2, step4 in zip(grads2, grads4):
        for a, b in zip(step2, step4):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        lock = OutputLock(tmp_path / "run").acquire()
    assert "cannot lock the output folder on this file system" in caplog.text
    lock.release()


def test_a_new_run_keeps_the_users_own_files_in_output_dir(tmp_path, dataset, tiny_ckpt):
    out = tmp_path / "output" / "sci_lab_lora"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "my_notes.txt").write_text("mine")
    (out / "loss.png").write_bytes(b"my chart")
    train(load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=1, logging_dir="./output/tb", **SMALL)))
    assert (out / "logs" / "my_notes.txt").read_text() == "mine"


def test_compare_reads_a_run_made_before_the_resolved_config_mark(tmp_path, dataset, tiny_ckpt):
    from lora_scripts.generation.compare import read_run
    from lora_scripts.training.runs import RESOLVED_MARK

    result = train(load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=1, **SMALL)))
    path = result.output_dir / "config.yaml"
    path.write_text(path.read_text().replace(RESOLVED_MARK + "\n", ""))  # as older versions wrote it
    assert read_run(result.output_dir).config["lora_rank"] == 4


def test_every_trained_network_accumulates_without_syncing(tmp_path, dataset, tiny_ckpt, monkeypatch):
    """Under several processes, gradient accumulation skips DDP's all-reduce until the boundary in every network
    that trains: the text encoder's too, not only the denoiser's (correct either way, but N times the traffic)."""
    from accelerate import Accelerator

    seen, accumulate = [], Accelerator.accumulate

    def recording(self, *models):
        seen.append(len(models))
        return accumulate(self, *models)

    monkeypatch.setattr(Accelerator, "accumulate", recording)
    config = load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=1, gradient_accumulation_steps=2,
                                     train_text_encoder=True, **SMALL))
    fit(Trainer(config).setup())
    assert seen and set(seen) == {2}, seen
