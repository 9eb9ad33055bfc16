"""The names we write must be exactly sd-scripts' for the same modules: A1111 and ComfyUI look them up by
name, and a name that is off by one character is silently not applied."""

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lora_scripts.families import FAMILIES
from lora_scripts.formats.kohya import KeyConversionError, kohya_module_name, kohya_to_peft, peft_to_kohya


def unet_target_modules(unet, preset):
    return FAMILIES["sd15"].target_modules("unet", unet, preset)


def text_encoder_target_modules(te, preset):
    return FAMILIES["sd15"].target_modules("text_encoder", te, preset)

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def sd15():
    """Real-size SD1.5 UNet and CLIP-L from the embedded configs, on the meta device (no memory, no download)."""
    configs = FAMILIES["sd15"].embedded_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    return unet, te


@pytest.mark.parametrize("preset,n_unet,n_te", [("kohya", 192, 72), ("attn", 128, 48), ("qv", 64, 24)])
def test_preset_names_equal_golden_lists(sd15, preset, n_unet, n_te):
    unet, te = sd15
    unet_names = sorted(kohya_module_name("unet", m) for m in unet_target_modules(unet, preset))
    te_names = sorted(kohya_module_name("text_encoder", m) for m in text_encoder_target_modules(te, preset))
    assert unet_names == (GOLDEN / f"sd15_{preset}_unet.txt").read_text().split()
    assert te_names == (GOLDEN / f"sd15_{preset}_te.txt").read_text().split()
    assert (len(unet_names), len(te_names)) == (n_unet, n_te)


def test_kohya_preset_keeps_proj_in_as_1x1_conv(sd15):
    unet, _ = sd15
    proj_in = unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert isinstance(proj_in, torch.nn.Conv2d) and proj_in.kernel_size == (1, 1)
    assert "down_blocks.0.attentions.0.proj_in" in unet_target_modules(unet, "kohya")


def test_explicit_list_targets_matching_modules(sd15):
    unet, _ = sd15
    names = unet_target_modules(unet, ["to_k"])
    assert len(names) == 32 and all(n.endswith("to_k") for n in names)


def test_peft_kohya_round_trip_and_alpha():
    states = {
        "unet": {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 8, 1, 1),
                 "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 4, 1, 1)},
        "text_encoder": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8),
                         "encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4)},
    }
    kohya = peft_to_kohya(states, {"unet": 2.0, "text_encoder": 2.0})
    assert set(kohya) == {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }
    assert kohya["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4
    back, alphas = kohya_to_peft(kohya, {"unet": ["down_blocks.0.attentions.0.proj_in"],
                                         "text_encoder": ["encoder.layers.0.self_attn.q_proj"]})
    for c in states:
        assert set(back[c]) == set(states[c]) and all(torch.equal(back[c][k], states[c][k]) for k in states[c])
    assert alphas["unet"] == {"down_blocks.0.attentions.0.proj_in": 2.0}
    with pytest.raises(KeyConversionError, match="match no module"):
        kohya_to_peft({"lora_unet_nothing.alpha": torch.tensor(1.0)}, {"unet": []})
