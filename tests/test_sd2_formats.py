"""SD2 pieces: the OpenCLIP text-encoder key map (checked against diffusers' own loader) and the configs."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.formats.ldm import LdmConversionError
from lora_scripts.formats.open_clip import (
    OPEN_CLIP_PREFIX,
    ldm_to_open_clip,
    open_clip_shapes_to_ldm,
    open_clip_to_ldm,
)

P = OPEN_CLIP_PREFIX
IDS = torch.tensor([[0, 17, 400, 999, 2, 1, 1, 1], [0, 5, 6, 7, 8, 9, 10, 2]])


def tiny_open_clip(layers: int, hidden: int = 64, heads: int = 4) -> CLIPTextModel:
    # SD2's special ids (bos 0, pad 1, eos 2) and gelu, as OpenCLIP-H; random weights, biases too.
    cfg = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, hidden_act="gelu",
                         intermediate_size=2 * hidden, vocab_size=1000, max_position_embeddings=77,
                         projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(layers)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def encode(model: CLIPTextModel) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).last_hidden_state


# 3 layers as a tiny model; 23 layers is SD2's own count, where diffusers drops resblocks.23 by name.
@pytest.mark.parametrize("layers,hidden", [(3, 64), (23, 32)])
def test_diffusers_single_file_loader_rebuilds_the_text_encoder_exactly(tmp_path, layers, hidden):
    model = tiny_open_clip(layers, hidden)
    model.config.save_pretrained(tmp_path / "text_encoder")
    ckpt = open_clip_to_ldm(model.state_dict())
    assert f"{P}transformer.resblocks.{layers}.attn.in_proj_weight" in ckpt  # the unused block real files carry

    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ckpt, subfolder="text_encoder", config=str(tmp_path), local_files_only=True)

    # diffusers leaves parameters it found no key for on `meta` instead of failing.
    assert not [n for n, p in loaded.named_parameters() if p.is_meta]
    assert torch.equal(encode(loaded.eval()), encode(model))


def test_zero_last_block_is_an_identity():
    """A loader that runs every block of the file (ComfyUI, A1111 at clip skip 1) gets SD2's output."""
    model = tiny_open_clip(3)
    full = ldm_to_open_clip(open_clip_to_ldm(model.state_dict()))  # keeps all 4 blocks
    four = CLIPTextModel(CLIPTextConfig(**{**model.config.to_dict(), "num_hidden_layers": 4})).eval()
    assert not four.load_state_dict(full, strict=True).missing_keys
    assert torch.equal(encode(four), encode(model))


def test_layer_zero_keys_are_golden():
    ckpt = open_clip_to_ldm(tiny_open_clip(3).state_dict())
    assert sorted(k for k in ckpt if ".resblocks.0." in k) == [
        P + "transformer.resblocks.0.attn.in_proj_bias",
        P + "transformer.resblocks.0.attn.in_proj_weight",
        P + "transformer.resblocks.0.attn.out_proj.bias",
        P + "transformer.resblocks.0.attn.out_proj.weight",
        P + "transformer.resblocks.0.ln_1.bias",
        P + "transformer.resblocks.0.ln_1.weight",
        P + "transformer.resblocks.0.ln_2.bias",
        P + "transformer.resblocks.0.ln_2.weight",
        P + "transformer.resblocks.0.mlp.c_fc.bias",
        P + "transformer.resblocks.0.mlp.c_fc.weight",
        P + "transformer.resblocks.0.mlp.c_proj.bias",
        P + "transformer.resblocks.0.mlp.c_proj.weight",
    ]
    assert sorted(k for k in ckpt if ".resblocks." not in k) == [
        P + "ln_final.bias", P + "ln_final.weight", P + "logit_scale", P + "positional_embedding",
        P + "text_projection", P + "token_embedding.weight",
    ]
    assert len(ckpt) == 4 * 12 + 6  # 3 used blocks + the unused one


def test_in_proj_is_q_k_v_stacked_and_reverse_round_trips():
    state = tiny_open_clip(3).state_dict()
    ckpt = open_clip_to_ldm(state)
    fused = ckpt[P + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([state[f"encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]))
    back = ldm_to_open_clip(ckpt, num_layers=3)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_shapes_match_tensors_and_real_sizes():
    model = tiny_open_clip(3)
    ckpt = open_clip_to_ldm(model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert open_clip_shapes_to_ldm(shapes) == {k: tuple(v.shape) for k, v in ckpt.items()}

    with torch.device("meta"):
        real = CLIPTextModel(CLIPTextConfig(**_configs()["text_encoder"]))
    planned = open_clip_shapes_to_ldm({k: tuple(v.shape) for k, v in real.state_dict().items()})
    # The layout of a real SD2 file: 24 resblocks, fused (3072, 1024) in_proj, (1024, 1024) text_projection.
    assert sum(".ln_1.weight" in k for k in planned) == 24
    assert planned[P + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert planned[P + "text_projection"] == (1024, 1024)
    assert planned[P + "token_embedding.weight"] == (49408, 1024)
    assert planned[P + "logit_scale"] == ()


@pytest.mark.parametrize("bad", ["text_projection.weight", "encoder.layers.0.self_attn.qkv.weight"])
def test_unknown_key_raises(bad):
    state = tiny_open_clip(3).state_dict()
    with pytest.raises(LdmConversionError, match="no OpenCLIP equivalent"):
        open_clip_to_ldm({**state, bad: torch.zeros(1)})


def test_transformers4_keys_convert_alike_and_a_mix_raises():
    """SD2 folders on the Hub were saved by transformers 4: `text_model.` keys and position_ids."""
    state = tiny_open_clip(3).state_dict()
    old = {f"text_model.{k}": v for k, v in state.items()} | {"text_model.embeddings.position_ids": torch.arange(77)}
    new, converted = open_clip_to_ldm(state), open_clip_to_ldm(old)
    assert new.keys() == converted.keys() and all(torch.equal(new[k], converted[k]) for k in new)
    with pytest.raises(LdmConversionError, match="both with and without"):
        open_clip_to_ldm({**state, "text_model.final_layer_norm.weight": torch.zeros(1)})


def test_missing_projection_raises():
    state = {k: v for k, v in tiny_open_clip(3).state_dict().items() if "layers.2.self_attn.k_proj" not in k}
    with pytest.raises(LdmConversionError, match="k_proj"):
        open_clip_to_ldm(state)


def test_reverse_rejects_foreign_keys():
    with pytest.raises(LdmConversionError, match="not under"):
        ldm_to_open_clip({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)})
    with pytest.raises(LdmConversionError, match="no transformers equivalent"):
        ldm_to_open_clip({P + "transformer.resblocks.0.attn.qkv.weight": torch.zeros(3)})


def _configs() -> dict[str, dict]:
    root = resources.files("lora_scripts.families.configs.sd2")
    names = ("unet", "vae", "text_encoder", "scheduler")
    return {c: json.loads(root.joinpath(f"{c}.json").read_text()) for c in names}


def test_real_size_configs_build_with_sd2_parameter_counts():
    cfg = _configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(te)) == (865_910_724, 83_653_863, 340_387_840)
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 1024
    assert te.config.hidden_act == "gelu" and te.config.num_hidden_layers == 23

    sched = DDPMScheduler.from_config(cfg["scheduler"])
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    assert sched.betas[0].item() == pytest.approx(0.00085) and sched.betas[-1].item() == pytest.approx(0.012)
