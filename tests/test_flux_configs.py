"""Flux.1 groundwork (issue 19): the real Flux.1-dev configs are embedded, so a flux1-dev.safetensors (and
schnell: the same without the guidance embedder) can be loaded offline once the family module lands. Built on
the meta device, each component has the published size."""

import json
from importlib import resources

import torch


def _configs():
    root = resources.files("lora_scripts.families.configs.flux1")
    return {n: json.loads(root.joinpath(f"{n}.json").read_text())
            for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")}


def test_embedded_flux_configs_build_the_published_sizes():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = _configs()
    plain = lambda c: {k: v for k, v in c.items() if k != "architectures"}  # noqa: E731
    with torch.device("meta"):
        dev = FluxTransformer2DModel.from_config(cfg["transformer"])
        schnell = FluxTransformer2DModel.from_config({**cfg["transformer"], "guidance_embeds": False})
        sizes = {"dev": dev, "schnell": schnell, "vae": AutoencoderKL.from_config(cfg["vae"]),
                 "clip_l": CLIPTextModel(CLIPTextConfig(**plain(cfg["text_encoder"]))),
                 "t5_xxl": T5EncoderModel(T5Config(**plain(cfg["text_encoder_2"])))}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in sizes.items()}
    assert counts == {"dev": 11_901_408_320, "schnell": 11_891_178_560, "vae": 83_819_683, "clip_l": 123_060_480,
                      "t5_xxl": 4_762_310_656}
    # 19 double-stream and 38 single-stream blocks; 16 latent channels packed 2x2 into 64 transformer inputs.
    assert (len(dev.transformer_blocks), len(dev.single_transformer_blocks)) == (19, 38)
    assert cfg["vae"]["latent_channels"] * 4 == cfg["transformer"]["in_channels"]
    schedule = FlowMatchEulerDiscreteScheduler.from_config(cfg["scheduler"])
    assert schedule.config.use_dynamic_shifting and schedule.config.shift == 3.0
