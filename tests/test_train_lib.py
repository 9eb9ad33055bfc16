"""Library-level training checks: learning happens, and the file we write is the model we trained."""

import io
import logging

import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import seed_config
from lora_scripts.config import load_config
from lora_scripts.families.loading import load_base_model
from lora_scripts.training.loop import fit
from lora_scripts.training.trainer import Trainer


def _trainer(tmp_path, tiny_ckpt, **overrides):
    return Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **overrides))).setup()


def test_loss_goes_down_on_a_fixed_batch(tmp_path, dataset, tiny_ckpt):
    tr = _trainer(tmp_path, tiny_ckpt, learning_rate=3e-3, lora_rank=8)
    batch = next(iter(tr.loader))
    losses = []
    for _ in range(30):
        # Same batch, same noise and timesteps every step: only the LoRA weights change.
        loss = tr.compute_loss(batch, tr.step_rng(0, 0))
        tr.accelerator.backward(loss)
        tr.optimizer.step()
        tr.optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.buf = io.StringIO()

    def emit(self, record):
        self.buf.write(record.getMessage() + "\n")


def _fresh_pipeline(path):
    m = load_base_model(path)
    return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=m.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_written_file_reproduces_the_trained_model_in_diffusers(tmp_path, dataset, tiny_ckpt, fmt):
    tr = _trainer(tmp_path, tiny_ckpt, learning_rate=1e-2, max_train_steps=4, train_text_encoder=True,
                  save_precision="fp32", lora_alpha=8, lora_rank=4, save_format="diffusers")
    result = fit(tr)
    path = result.lora_path if fmt == "kohya" else result.diffusers_path
    torch.manual_seed(0)
    ids = tr.model.tokenizer(["sci lab, glowing consoles"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    unet, text_encoder = tr.trained["unet"], tr.trained["text_encoder"]
    unet.eval()
    text_encoder.eval()
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        expected = unet(latents, t, hidden).sample
        base_hidden = _fresh_pipeline(tiny_ckpt).text_encoder(ids)[0]
    assert (hidden - base_hidden).abs().max() > 1e-4  # the text-encoder LoRA did change something

    pipe = _fresh_pipeline(tiny_ckpt)
    cap = _Capture()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(cap)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        pipe.load_lora_weights(str(path))
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(cap)
    log = cap.buf.getvalue().lower()
    assert "unexpected" not in log and "not loaded" not in log and "unused" not in log, log
    with torch.no_grad():
        got_hidden = pipe.text_encoder(ids)[0]
        got = pipe.unet(latents, t, got_hidden).sample
    # fp32 file, same maths in a different module layout: equal to float rounding.
    assert (got_hidden - hidden).abs().max() < 1e-5
    assert (got - expected).abs().max() < 1e-5
