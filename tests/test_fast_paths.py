"""Fast paths change speed and memory, not results: each is trained against the plain path on the same seed.

Tolerances: layout, compile, checkpointing and SDPA change only the order of float operations, so the LoRAs
agree to float32 rounding (rtol 1e-3, atol 1e-4 after a few AdamW steps). bf16 autocast rounds every
activation to 8 mantissa bits, so its LoRA is compared by the update it learned (lora_up, which starts at
zero), which must point the same way as the fp32 update (cosine > 0.9) and be of the same size (±20 %)."""

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from safetensors.torch import load_file

from conftest import seed_config
from lora_scripts.config import load_config
from lora_scripts.training.loop import fit, train
from lora_scripts.training.trainer import Trainer

RUN = dict(max_train_steps=3, batch_size=2, save_precision="fp32", learning_rate=1e-3, verify_after_training=False,
           channels_last=False)


def _lora(tmp_path, tiny_ckpt, name, **kw):
    return load_file(str(train(load_config(seed_config(tmp_path, tiny_ckpt, output_dir=f"./out/{name}",
                                                       **dict(RUN, **kw)))).lora_path))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_channels_last_and_compile_give_the_same_lora(tmp_path, dataset, tiny_ckpt, monkeypatch):
    """compile runs with the aot_eager backend: the same graph capture as inductor, without a C compiler in CI."""
    import lora_scripts.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    plain = _lora(tmp_path, tiny_ckpt, "plain")
    fast = _lora(tmp_path, tiny_ckpt, "fast", channels_last=True, torch_compile=True)
    _assert_same(plain, fast)


def test_channels_last_covers_unet_and_vae(tmp_path, dataset, tiny_ckpt):
    t = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **dict(RUN, channels_last=True)))).setup()
    for model in (t.model.unet, t.model.vae):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_gradient_checkpointing_gives_the_same_lora(tmp_path, dataset, tiny_ckpt):
    plain = _lora(tmp_path, tiny_ckpt, "plain")
    checkpointed = _lora(tmp_path, tiny_ckpt, "gc", gradient_checkpointing=True)
    _assert_same(plain, checkpointed)


def test_sdpa_attention_matches_the_classic_attention(tmp_path, dataset, tiny_ckpt):
    """The trainer's UNet runs PyTorch SDPA (flash / memory-efficient kernels on GPUs); the explicit
    softmax(QK^T)V it replaces gives the same loss and LoRA gradients."""
    t = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **RUN))).setup()
    unet = t.model.unet
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    batch = next(iter(t.loader))

    def loss_and_grads():
        unet.zero_grad(set_to_none=True)
        loss = t.compute_loss(batch, torch.Generator().manual_seed(0))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    sdpa_loss, sdpa_grads = loss_and_grads()
    unet.set_attn_processor(AttnProcessor())
    classic_loss, classic_grads = loss_and_grads()
    torch.testing.assert_close(sdpa_loss, classic_loss, rtol=1e-5, atol=1e-6)
    assert sdpa_grads.keys() == classic_grads.keys() and sdpa_grads
    for n in sdpa_grads:
        torch.testing.assert_close(sdpa_grads[n], classic_grads[n], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_learns_the_same_update(tmp_path, dataset, tiny_ckpt):
    t = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, **dict(RUN, mixed_precision="bf16")))).setup()
    assert t.model.vae.dtype == torch.bfloat16 and t.model.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in t.optimizer.param_groups[0]["params"])  # LoRA weights stay fp32
    fp32 = _lora(tmp_path, tiny_ckpt, "fp32")
    bf16 = _lora(tmp_path, tiny_ckpt, "bf16", mixed_precision="bf16")
    # lora_up starts at zero, so its trained value is the whole update.
    d32 = torch.cat([fp32[k].flatten() for k in sorted(fp32) if "lora_up" in k])
    d16 = torch.cat([bf16[k].flatten() for k in sorted(fp32) if "lora_up" in k])
    assert d32.norm() > 0
    cosine = torch.nn.functional.cosine_similarity(d32, d16, dim=0)
    assert cosine > 0.9, cosine
    assert 0.8 < d16.norm() / d32.norm() < 1.2


def test_foreach_adamw_gives_the_same_lora(tmp_path, dataset, tiny_ckpt, monkeypatch):
    """The trainer's multi-tensor AdamW (foreach on CPU, fused on CUDA) against the one-tensor-at-a-time loop."""
    plain_adamw, made = torch.optim.AdamW, []

    def one_at_a_time(*args, **kwargs):
        made.append(kwargs)
        return plain_adamw(*args, **dict(kwargs, foreach=False, fused=None))

    fast = _lora(tmp_path, tiny_ckpt, "foreach")
    monkeypatch.setattr(torch.optim, "AdamW", one_at_a_time)
    loop = _lora(tmp_path, tiny_ckpt, "loop")
    assert made and made[0].get("foreach") is True  # the trainer's own choice on CPU, replaced here
    _assert_same(fast, loop)
