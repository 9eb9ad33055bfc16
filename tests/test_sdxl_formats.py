"""SDXL groundwork (issue 18): the real configs are embedded; the kohya names an SDXL LoRA must carry are
derived from them as sd-scripts writes them (UNet in the SGM layout, lora_te1_/lora_te2_), every UNet name
resolving to a weight of the real SGM key set; and the pure key maps write a tiny SDXL in the SGM single-file
layout that diffusers loads back exactly. SDXL files are still refused for training (see families/detect.py)."""

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


def _tiny_sdxl():
    """Different text-encoder widths (equal ones make diffusers' single-file loader swap the encoders silently),
    10 layers in the second (diffusers' own SDXL marker is in block 9), projection width != encoder width (a
    missing transpose of text_projection then fails instead of loading silently)."""
    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                                       hidden_act="quick_gelu", projection_dim=32, **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                                     num_hidden_layers=10, hidden_act="gelu", projection_dim=48, **clip))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 2, 4),
        use_linear_projection=True, cross_attention_dim=96, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 48)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, scaling_factor=0.13025)
    with torch.no_grad():  # every tensor random, norms included: a swapped or skipped tensor shows
        for module in (te1, te2, unet, vae):
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    return {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}


def test_a_tiny_sdxl_written_in_the_sgm_layout_loads_exactly_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from lora_scripts.families.clip_tokenizer import write_clip_tokenizer_files
    from lora_scripts.formats.ldm import clip_to_ldm, vae_to_ldm
    from lora_scripts.formats.open_clip import open_clip_with_projection_to_ldm

    mods = _tiny_sdxl()
    state = unet_to_ldm(mods["unet"].state_dict(), 2, text_time=True)
    state.update(vae_to_ldm(mods["vae"].state_dict()))
    state.update(clip_to_ldm(mods["text_encoder"].state_dict(), "conditioner.embedders.0.transformer."))
    state.update(open_clip_with_projection_to_ldm(mods["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "sdxl.safetensors"))
    folder = tmp_path / "config"
    folder.mkdir()
    index = {"_class_name": "StableDiffusionXLPipeline", "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    for name in ("unet", "vae"):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps(dict(mods[name].config)))
    for name in ("text_encoder", "text_encoder_2"):
        mods[name].config.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_config("scheduler")))
    write_clip_tokenizer_files(folder / "tokenizer")
    write_clip_tokenizer_files(folder / "tokenizer_2", pad_token="!")
    pipe = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "sdxl.safetensors"), config=str(folder),
                                                      local_files_only=True)
    for name, module in mods.items():
        loaded = getattr(pipe, name).state_dict()
        want = module.state_dict()
        assert loaded.keys() == want.keys(), name
        assert all(torch.equal(loaded[k], want[k]) for k in want), name
