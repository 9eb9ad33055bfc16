"""The optimizers beyond AdamW: each trains, resumes bit-exactly and is named in the file as sd-scripts names it;
schedule-free exports its averaged weights; bad settings are config errors naming the key and the fix."""

import csv

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import seed_config
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError
from lora_scripts.training.loop import fit, train
from lora_scripts.training.trainer import Trainer

RUN = dict(max_train_steps=6, save_steps=3, batch_size=2, lora_rank=4, save_precision="fp32", flip_aug=True,
           lora_dropout=0.1, verify_after_training=False)
CASES = {  # optimizer: (its settings, what ss_optimizer starts with)
    "adamw8bit": (dict(learning_rate=1e-3), "bitsandbytes.optim.adamw.AdamW8bit"),  # bitsandbytes runs it on CPU
    "paged_adamw8bit": (dict(learning_rate=1e-3), "bitsandbytes.optim.adamw.PagedAdamW8bit"),
    "prodigy": (dict(learning_rate=1.0, optimizer_args=["d_coef=2"]), "prodigyopt.prodigy.Prodigy(decouple=True"),
    "lion": (dict(learning_rate=1e-4, weight_decay=0.1), "lion_pytorch.lion_pytorch.Lion"),
    "adafactor": (dict(learning_rate=1e-3), "transformers.optimization.Adafactor(scale_parameter=False"),
    "adamw_schedulefree": (dict(learning_rate=1e-3, lr_warmup_steps=2), "schedulefree.adamw_schedulefree.AdamWScheduleFree"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_optimizer_trains_and_resumes_bit_exactly(tmp_path, dataset, tiny_ckpt, name):
    settings, label = CASES[name]
    whole = train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/whole", optimizer=name, **settings,
                                          **RUN)))
    checkpoint = whole.output_dir / "checkpoints" / "step-3"
    resumed = train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/resumed", optimizer=name,
                                            **settings, **RUN)), resume=checkpoint)
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed run differs"
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # it trained
    with safe_open(str(whole.lora_path), "pt") as f:
        assert f.metadata()["ss_optimizer"].startswith(label), f.metadata()["ss_optimizer"]
    if name == "prodigy":  # the logged lr is the step Prodigy really takes: d (from d0 = 1e-6) x learning_rate 1.0
        rows = list(csv.DictReader((whole.output_dir / "loss.csv").open()))
        assert all(float(r["lr"]) == pytest.approx(1e-6, rel=0.01) for r in rows)


def test_schedule_free_files_hold_its_averaged_weights(tmp_path, dataset, tiny_ckpt):
    """The file, previews and validation use the eval() weights; training goes on from the train() ones, untouched
    by a save (a run that saved a checkpoint continues exactly as one that did not)."""
    settings, _ = CASES["adamw_schedulefree"]
    trainer = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, optimizer="adamw_schedulefree", **settings,
                                              **dict(RUN, save_steps=0)))).setup()
    result = fit(trainer)
    saved = load_file(str(result.lora_path))
    training = {c: {k: v.clone() for k, v in s.items()} for c, s in trainer.lora_states().items()}
    trainer.optimizer.eval()
    averaged = trainer.lora_states()
    from lora_scripts.training.export import kohya_file_contents

    want, _ = kohya_file_contents(trainer.config, trainer.run_facts(), averaged, 6, 1, 6)
    other, _ = kohya_file_contents(trainer.config, trainer.run_facts(), training, 6, 1, 6)
    assert all(torch.equal(saved[k], want[k]) for k in want)
    assert not all(torch.equal(saved[k], other[k]) for k in other)


def test_bad_optimizer_settings_are_named(tmp_path, dataset, tiny_ckpt, monkeypatch):
    def problems(**kw):
        with pytest.raises(ConfigError) as err:
            Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **kw)))
        return str(err.value)

    assert "learning_rate = 0.0002 with optimizer: prodigy" in problems(optimizer="prodigy")
    import bitsandbytes

    def no_kernel(self, closure=None):
        raise NotImplementedError("no 8-bit kernel for this device")

    with monkeypatch.context() as m:
        m.setattr(bitsandbytes.optim.AdamW8bit, "step", no_kernel)
        assert "optimizer = adamw8bit: bitsandbytes cannot run it on this machine's cpu (NotImplementedError: no " \
               "8-bit kernel for this device); use optimizer: adamw here" in problems(optimizer="adamw8bit")
    assert "optimizer_args.d_coeff: Prodigy takes no such argument; it takes" in problems(
        optimizer="prodigy", learning_rate=1.0, optimizer_args={"d_coeff": 2})
    assert "lr_scheduler = cosine with optimizer: adamw_schedulefree" in problems(optimizer="adamw_schedulefree",
                                                                                 lr_scheduler="cosine")
    assert "optimizer_args.relative_step = true" in problems(optimizer="adafactor", optimizer_args={"relative_step": True})
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda n, *a: (_ for _ in ()).throw(ImportError(f"No module named '{n}'")) if n == "lion_pytorch"
                        else real(n, *a))
    assert "optimizer = lion: its package is not installed" in problems(optimizer="lion") and "pip install lion-pytorch" \
        in problems(optimizer="lion")
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, optimizer="prodigy", learning_rate=1.0,
                                  optimizer_args=["d_coef=2", "decouple=True", "betas=(0.9, 0.99)"]))
    assert cfg.optimizer_args == {"d_coef": 2, "decouple": True, "betas": [0.9, 0.99]}


def test_block_lr_gives_each_block_its_learning_rate(tmp_path, dataset, tiny_ckpt, tiny_flux_files):
    """block_lr multiplies learning_rate per denoiser block, by inspect's block names or their start: one optimizer
    group per multiplier (learning_rate's first), every LoRA parameter in exactly one, Flux's fused layers' shared
    factors once; the file records it; a name the model lacks is a config error listing its blocks."""
    from conftest import flux_keys

    from lora_scripts.training.block_lr import covers

    run = dict(max_train_steps=2, batch_size=2, lora_rank=4, learning_rate=1e-3, save_precision="fp32",
               verify_after_training=False)
    trainer = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, block_lr={"unet.down": 0, "unet.up_1": 2.0}, **run)))
    trainer.setup()
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.0, 2e-3]
    counted = [id(p) for g in groups for p in g["params"]]
    unet = trainer.model.denoiser
    assert len(counted) == len(set(counted)) == sum(p.requires_grad for p in unet.parameters())
    down = {id(p) for n, p in unet.named_parameters() if n.startswith("down_blocks.") and p.requires_grad}
    assert down == {id(p) for p in groups[1]["params"]}
    assert covers("unet.input_1", "unet.input_1") and not covers("unet.input_1", "unet.input_10")

    from lora_scripts.training.export import network_args

    assert network_args(trainer.config)["block_lr"] == {"unet.down": 0, "unet.up_1": 2.0}  # ss_network_args

    flux = Trainer(load_config(seed_config(tmp_path, tiny_flux_files["base_model"], output_dir="./out/f",
                                           network_type="loha", block_lr={"transformer.single_blocks": 0.5},
                                           **flux_keys(tiny_flux_files), **run)))
    flux.setup()
    assert [g["lr"] for g in flux.optimizer.param_groups] == [1e-3, 5e-4]
    single = {id(p) for n, p in flux.model.denoiser.named_parameters() if n.startswith("single_") and p.requires_grad}
    assert single == {id(p) for p in flux.optimizer.param_groups[1]["params"]}

    with pytest.raises(ConfigError, match=r"block_lr: 'unet.left' names no block the Stable Diffusion 1.x LoRA "
                                          r"trains; its blocks are unet.down_0, .*unet.mid"):
        Trainer(load_config(seed_config(tmp_path, tiny_ckpt, output_dir="./out/x", block_lr={"unet.left": 1},
                                        **run))).setup()
