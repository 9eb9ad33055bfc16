import torch
import pytest
from safetensors.torch import load_file, save_file

from lora_scripts.errors import ModelLoadError
from lora_scripts.families import detect_family
from lora_scripts.families.loading import load_base_model
from lora_scripts.families.clip_tokenizer import clip_tokenizer
from lora_scripts.families.tiny import build_tiny_models


def test_clip_tokenizer_matches_openai_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("x " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_single_file_round_trip_is_exact(tiny_ckpt):
    """Our LDM writer + diffusers' single-file loader reproduce every weight bit for bit."""
    model = load_base_model(tiny_ckpt)
    assert model.family.name == "sd15" and model.prediction_type == "epsilon"
    unet, vae, te, _ = build_tiny_models(seed=0)
    for ref, got in ((unet, model.unet), (vae, model.vae), (te, model.text_encoder)):
        a, b = ref.state_dict(), got.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ldm_layout_keys(tiny_ckpt):
    keys = set(load_file(str(tiny_ckpt)))
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # upsampler after a resnet-only block
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(tmp_path / "nope.safetensors")


def test_corrupt_file(tmp_path, tiny_ckpt):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(tiny_ckpt.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="corrupt, truncated"):
        load_base_model(bad)


def test_lora_passed_as_base(tmp_path):
    path = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(ModelLoadError, match="is a LoRA file, not a base model"):
        load_base_model(path)


def test_family_detection():
    sd1 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
           "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    assert detect_family(sd1) == "sd15"
    sd2 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
           "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}
    assert detect_family(sd2) == "sd2"
    sdxl = dict(sd1, **{"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)})
    with pytest.raises(ModelLoadError, match="SDXL"):
        detect_family(sdxl)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint"):
        detect_family({"encoder.weight": (3, 3)})


def test_sd2_file_without_its_objective_is_refused_naming_the_key_then_incomplete(tmp_path):
    """512-base and 768-v files have the same keys: no silent guess, the message names prediction_type; given
    it, an incomplete SD2 file is refused as such."""
    from lora_scripts.families import LoadSettings

    path = tmp_path / "v2-1_768.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match="Stable Diffusion 2.x checkpoint.*prediction_type: v_prediction"):
        load_base_model(path)
    with pytest.raises(ModelLoadError, match="could not load .* as Stable Diffusion 2.x"):
        load_base_model(path, LoadSettings(prediction_type="v_prediction"))


def test_incomplete_checkpoint_is_refused(tmp_path, tiny_ckpt):
    state = load_file(str(tiny_ckpt))
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt), "pt") as f:
        meta = f.metadata()
    del state["model.diffusion_model.out.2.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ModelLoadError):
        load_base_model(path)


def test_legacy_format_ckpt_is_read(tmp_path):
    """Old .ckpt files use torch's pre-zip format, which cannot be memory-mapped: read them anyway."""
    from lora_scripts.families.loading import read_checkpoint_info

    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}}, path,
               _use_new_zipfile_serialization=False)
    assert read_checkpoint_info(path).shapes == {"model.diffusion_model.input_blocks.0.0.weight": (2, 2)}
