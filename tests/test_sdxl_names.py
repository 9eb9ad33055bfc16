"""SDXL groundwork (issue 18): the real configs are embedded, and the kohya names an SDXL LoRA must carry are
derived from them as sd-scripts writes them (UNet in the SGM layout, lora_te1_/lora_te2_), every UNet name
resolving to a weight of the real SGM key set. SDXL files are still refused for training (see families/detect.py)."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_scripts.families.stable_diffusion import _text_encoder_targets, _unet_targets
from lora_scripts.formats.kohya import text_encoder_name, unet_name_from_ldm
from lora_scripts.formats.ldm import UNET_PREFIX, _unet_key, unet_to_ldm

GOLDEN = Path(__file__).parent / "golden"


def _config(name):
    return json.loads(resources.files("lora_scripts.families.configs.sdxl").joinpath(f"{name}.json").read_text())


@pytest.fixture(scope="module")
def sdxl():
    """Real-size SDXL base networks on the meta device (no memory, no download)."""
    te = lambda cls, cfg: cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(_config("unet")), "vae": AutoencoderKL.from_config(_config("vae")),
                "te1": te(CLIPTextModel, _config("text_encoder")),
                "te2": te(CLIPTextModelWithProjection, _config("text_encoder_2"))}


def test_embedded_configs_build_the_published_sizes(sdxl):
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in sdxl.items()}
    assert sizes == {"unet": 2_567_463_684, "vae": 83_653_863, "te1": 123_060_480, "te2": 694_659_840}


def test_kohya_names_are_sgm_names_that_resolve_in_the_real_key_set(sdxl):
    unet = sdxl["unet"]
    lpb = unet.config.layers_per_block
    up_attn = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
    sgm = unet_to_ldm({k: None for k in unet.state_dict()}, lpb, text_time=True)  # the real SGM UNet keys
    assert UNET_PREFIX + "label_emb.0.0.weight" in sgm
    ldm = {p: UNET_PREFIX + _unet_key(f"{p}.weight", lpb, up_attn, text_time=True) for p in _unet_targets(unet, "kohya")}
    assert set(ldm.values()) <= set(sgm)
    unet_names = sorted(unet_name_from_ldm(k) for k in ldm.values())
    te_names = sorted([text_encoder_name("lora_te1_", p) for p in _text_encoder_targets(sdxl["te1"], "kohya")]
                      + [text_encoder_name("lora_te2_", p) for p in _text_encoder_targets(sdxl["te2"], "kohya")])
    assert (len(unet_names), len(te_names)) == (722, 264)
    # Names as sd-scripts writes them (issue 18, sd-scripts networks/lora.py on its SGM-named SDXL UNet).
    assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_out_0", "lora_unet_output_blocks_2_1_proj_out",
            "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2"} <= set(unet_names)
    assert {"lora_te1_text_model_encoder_layers_11_mlp_fc2",
            "lora_te2_text_model_encoder_layers_31_self_attn_v_proj"} <= set(te_names)
    assert unet_names == (GOLDEN / "sdxl_kohya_unet.txt").read_text().split()
    assert te_names == (GOLDEN / "sdxl_kohya_te.txt").read_text().split()


def test_text_time_mapping_only_where_asked():
    from lora_scripts.formats.ldm import LdmConversionError

    assert _unet_key("add_embedding.linear_2.bias", 2, {}, text_time=True) == "label_emb.0.2.bias"
    with pytest.raises(LdmConversionError):
        _unet_key("add_embedding.linear_2.bias", 2, {})
