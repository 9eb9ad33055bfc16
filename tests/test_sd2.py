"""Stable Diffusion 2.x as a second trainable family: loading (single file in the OpenCLIP layout, diffusers
folder), its objective (epsilon 512-base, v 768-v), the family interface on a tiny model of each family, and
files written as sd-scripts writes SD2 LoRAs."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import BASES, seed_config
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError
from lora_scripts.families import FAMILIES, LoadSettings, detect_folder_family
from lora_scripts.families.loading import load_base_model
from lora_scripts.training.loop import train

GOLDEN = Path(__file__).parent / "golden"


def test_tiny_sd2_single_file_loads_as_sd2_v_with_openclip_tokenizer(tiny_sd2_ckpt):
    model = load_base_model(tiny_sd2_ckpt)
    assert model.family.name == "sd2" and model.prediction_type == "v_prediction"
    assert "embedded scheduler config" in model.objective_reason
    assert not [n for m in model.modules.values() for n, p in m.named_parameters() if p.device.type == "meta"]
    tok = model.tokenizers["tokenizer"]
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    # OpenCLIP pads with "!" (id 0) after the end token; OpenAI's CLIP (SD1) pads with the end token.
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and set(ids[7:]) == {0}
    assert model.text_encoder.config.hidden_act == "gelu" and model.unet.config.use_linear_projection
    eps = load_base_model(tiny_sd2_ckpt, LoadSettings(prediction_type="epsilon"))
    assert eps.prediction_type == "epsilon" and "in the config" in eps.objective_reason


def test_tiny_sd2_folder_is_recognised_from_its_configs(tiny_sd2_base_folder, tiny_ckpt, tmp_path):
    assert detect_folder_family(tiny_sd2_base_folder) == "sd2"
    model = load_base_model(tiny_sd2_base_folder)
    assert model.family.name == "sd2" and model.prediction_type == "epsilon"
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        load_base_model(tiny_sd2_base_folder, LoadSettings(zero_terminal_snr=True))
    z = load_base_model(tiny_sd2_base_folder, LoadSettings("v_prediction", zero_terminal_snr=True))
    assert z.schedule.alphas_cumprod[-1] == 0 and "zero-terminal-SNR" in z.objective.describe()


@pytest.mark.parametrize("base", BASES)
def test_family_interface_encode_objective_loss(base, request):
    """tokenize -> encode -> objective -> predict -> loss on a tiny model of each family, without training."""
    model = load_base_model(request.getfixturevalue(base))
    family = model.family
    tokens = family.tokenize(model.tokenizers, ["a red circle", "neon"])
    cond = family.encode(model.text_encoders, tokens, "cpu")
    assert cond.hidden.shape[:2] == (2, 77) and cond.rows()[1].hidden.shape == cond.hidden.shape[1:]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noised = model.objective.sample(latents, torch.Generator().manual_seed(1))
    placement = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)  # SDXL's size conditioning; SD1/SD2 ignore it
    with torch.no_grad():
        pred = family.predict(model.denoiser, noised.noisy, noised.timesteps, cond, placement)
    loss = model.objective.loss(pred, noised)
    assert pred.shape == latents.shape and torch.isfinite(loss)
    target = model.objective.target(noised)
    assert torch.equal(target, noised.noise) == (model.prediction_type == "epsilon")


def test_sd2_kohya_names_equal_golden_lists_from_the_real_config():
    """330 modules at real size: 192 UNet (as SD1: every Linear in the transformers, proj_in/out Linear in SD2)
    and 23 x 6 text-encoder layers named as sd-scripts names an HF CLIPTextModel."""
    family = FAMILIES["sd2"]
    modules = family.meta_modules(family.embedded_configs())
    names = {c: sorted(family.kohya_name(c, m) for m in family.target_modules(c, modules[c], "kohya"))
             for c in ("unet", "text_encoder")}
    assert names["unet"] == (GOLDEN / "sd2_kohya_unet.txt").read_text().split()
    assert names["text_encoder"] == (GOLDEN / "sd2_kohya_te.txt").read_text().split()
    assert (len(names["unet"]), len(names["text_encoder"])) == (192, 138)
    proj_in = modules["unet"].get_submodule("down_blocks.0.attentions.0.proj_in")
    assert isinstance(proj_in, torch.nn.Linear)  # written 2-D: diffusers refuses 4-D SD2 proj weights


def test_sd2_module_table_names_the_openclip_weights_a1111_patches():
    """A1111 applies q/k/v to row thirds of the fused in_proj, fc1/fc2 to c_fc/c_proj."""
    family = FAMILIES["sd2"]
    table = family.module_table(family.embedded_configs())
    q = table["lora_te_text_model_encoder_layers_5_self_attn_q_proj"]
    v = table["lora_te_text_model_encoder_layers_5_self_attn_v_proj"]
    assert q.ldm_key == v.ldm_key == "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"
    assert (q.rows, v.rows, q.ldm_shape) == ((0, 1024), (2048, 3072), (3072, 1024))
    assert table["lora_te_text_model_encoder_layers_5_mlp_fc2"].ldm_key.endswith("resblocks.5.mlp.c_proj.weight")
    assert table["lora_unet_mid_block_attentions_0_proj_in"].ldm_key == \
        "model.diffusion_model.middle_block.1.proj_in.weight"


@pytest.mark.slow
def test_sd2_v_trains_end_to_end_and_the_file_is_an_sd2_lora(tmp_path, dataset, tiny_sd2_ckpt):
    cfg = load_config(seed_config(tmp_path, tiny_sd2_ckpt, epochs=2, train_text_encoder=True, save_precision="fp32",
                                  validation_split=0.25, validate_every_n_steps=1, sample_every_n_steps=4,
                                  sample_prompts=[{"prompt": "a lab", "steps": 2, "size": 64}]))
    result = train(cfg)
    assert len(list((result.output_dir / "samples").glob("*.png"))) >= 1  # previews through the SD2 pipeline
    assert "0 unmatched" in result.verified  # the self-test: names against the base's OpenCLIP layout, and effect
    with safe_open(str(result.lora_path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        proj = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", "sd_v2_v")
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == ("stable-diffusion-v2-768-v/lora", "v")
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight" in keys
    assert proj.ndim == 2 and result.validation and all(torch.isfinite(torch.tensor(v)) for _, v in result.validation)
    _every_command_works_on(result.lora_path, tiny_sd2_ckpt, tmp_path)


def _every_command_works_on(lora: Path, base: Path, tmp_path: Path) -> None:
    """inspect, verify, convert, resize, merge (LoRAs, and baked into the base), generate: as for SD1."""
    from lora_scripts.cli import main
    from lora_scripts.interop.describe import describe

    d = describe(lora)
    assert d.family == "sd2" and not d.warnings
    assert main(["verify", str(lora), "--base", str(base)]) == 0
    assert main(["convert", str(lora), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--base", str(base)]) == 0
    assert main(["resize", str(lora), str(tmp_path / "r2.safetensors"), "--rank", "2"]) == 0
    with safe_open(str(tmp_path / "r2.safetensors"), "pt") as f:
        assert (f.metadata()["ss_base_model_version"], f.metadata()["ss_v2"]) == ("sd_v2_v", "True")
    assert main(["merge", "--lora", f"{lora}:0.5", "--lora", str(tmp_path / "r2.safetensors"),
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["merge", "--lora", str(lora), "--base", str(base), "--out", str(tmp_path / "baked.safetensors")]) == 0
    assert load_base_model(tmp_path / "baked.safetensors").family.name == "sd2"  # still an SD2 v file
    out = tmp_path / "gen"
    assert main(["generate", "--base", str(base), "--prompt", f"a lab <lora:{lora.stem}:0.8>", "--lora-dir",
                 str(lora.parent), "--steps", "2", "--size", "32x32", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    assert main(["compare", str(lora.parent), "--prompt", "a lab", "--steps", "2", "--size", "32x32",
                 "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").is_file()


def test_init_and_check_use_the_family_defaults(tmp_path, dataset, tiny_sd2_ckpt):
    """768 px for a 768-v base; an SD2 file that does not say what it predicts gets prediction_type to set."""
    from conftest import make_images
    from lora_scripts.init_config import starter_yaml
    from lora_scripts.training.memory import estimate_memory
    from safetensors.torch import save_file

    make_images(tmp_path / "imgs", 2, size=(900, 900))
    assert "resolution: 768 " in starter_yaml(tmp_path / "imgs", str(tiny_sd2_ckpt), tmp_path)
    unsure = tmp_path / "v2-1.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}, str(unsure))
    text = starter_yaml(tmp_path / "imgs", str(unsure), tmp_path)
    assert "prediction_type: auto" in text and "resolution: 512 " in text
    # The memory estimate of a real-size SD2 (embedded configs) at 768 px is larger than at 512 px.
    small = estimate_memory(load_config(seed_config(tmp_path, unsure, resolution=512, batch_size=1)))
    large = estimate_memory(load_config(seed_config(tmp_path, unsure, resolution=768, batch_size=1)))
    assert 1.5 < large.activations / small.activations < 3.5 and large.weights == small.weights > 2.4e9


@pytest.mark.slow
def test_sd2_base_folder_trains_and_qv_text_encoder_targets_are_refused(tmp_path, dataset, tiny_sd2_base_folder):
    with pytest.raises(ConfigError, match="q_proj, k_proj, v_proj and out_proj"):
        train(load_config(seed_config(tmp_path, tiny_sd2_base_folder, epochs=1, train_text_encoder=True,
                                      lora_targets="qv", output_dir="./output/qv")))
    result = train(load_config(seed_config(tmp_path, tiny_sd2_base_folder, epochs=1)))
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.prediction_type"]) == ("sd_v2", "epsilon")
    assert "0 unmatched" in result.verified


SD1 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
       "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
SD2 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
       "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}


@pytest.mark.parametrize("shapes,meta,expected", [
    (SD1, {}, "sd15"),
    (SD2, {}, "sd2"),
    (SD2, {"modelspec.prediction_type": "v"}, "sd2"),
    (dict(SD1, **{"conditioner.embedders.1.model.positional_embedding": (77, 1280)}), {}, "SDXL-layout checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight":
      (1280, 2816), "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
      "conditioner.embedders.1.model.positional_embedding": (77, 1280)}, {}, "sdxl"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, {}, "SD3 checkpoint"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, {}, "flux1"),  # trained since issue 19
    ({"single_stream_modulation.lin.weight": (18432, 3072)}, {}, "Flux.2 transformer"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 1280)}, {}, "is a LoRA file"),
])
def test_family_detection_table(shapes, meta, expected):
    from lora_scripts.errors import ModelLoadError
    from lora_scripts.families import detect_family

    if expected in FAMILIES:
        assert detect_family(shapes, "m.safetensors", meta) == expected
    else:
        with pytest.raises(ModelLoadError, match=expected):
            detect_family(shapes, "m.safetensors", meta)


def test_sd2_v_is_told_by_metadata_and_folders_without_components_are_refused(tmp_path):
    """768-v vs 512-base: only metadata tells (modelspec.prediction_type); a folder says it by its scheduler, and
    one without its component configs is named as incomplete whatever its model_index says."""
    import json

    from lora_scripts.errors import ModelLoadError

    sd2 = FAMILIES["sd2"]
    assert sd2.stated_prediction_type(tmp_path / "f.safetensors", {"modelspec.prediction_type": "v"}) == "v_prediction"
    assert sd2.stated_prediction_type(tmp_path / "f.safetensors", {}) is None
    assert sd2.resolution_for("v_prediction") == 768 and sd2.resolution_for("epsilon") == 512
    folder = tmp_path / "sdxl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError, match="not a complete diffusers model"):
        detect_folder_family(folder)


@pytest.mark.parametrize("family,prediction", [("sd15", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction")])
def test_each_family_loads_alike_from_a_single_file_and_a_folder(tmp_path, family, prediction):
    """The same tiny model written both ways users have it loads to the same networks and the same objective."""
    from lora_scripts.families.tiny import write_tiny_checkpoint, write_tiny_folder

    single = load_base_model(write_tiny_checkpoint(tmp_path / "m.safetensors", 3, family=family, prediction_type=prediction))
    folder = load_base_model(write_tiny_folder(tmp_path / "m", 3, family=family, prediction_type=prediction))
    for model in (single, folder):
        assert (model.family.name, model.prediction_type) == (family, prediction)
    ids = single.family.tokenize(single.tokenizers, ["a red circle"])["input_ids"]
    assert torch.equal(ids, folder.family.tokenize(folder.tokenizers, ["a red circle"])["input_ids"])
    for name in single.modules:
        a, b = single.modules[name].state_dict(), folder.modules[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_folders_as_the_hub_has_them(tmp_path, tiny_sd2_base_folder, tiny_ckpt):
    """SD2 folders written by transformers 4 (text_model. keys, position_ids), an SD2 folder whose scheduler does
    not say its objective, SD1 folders saved under another pipeline class, and inpainting models."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from lora_scripts.errors import ModelLoadError
    from lora_scripts.families.tiny import write_tiny_folder
    from lora_scripts.interop.table import base_shapes

    old = shutil.copytree(tiny_sd2_base_folder, tmp_path / "sd2-tf4")
    weights = old / "text_encoder" / "model.safetensors"
    state = {f"text_model.{k}": v for k, v in load_file(str(weights)).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, str(weights))
    assert base_shapes(old) == base_shapes(tiny_sd2_base_folder)
    a, b = load_base_model(old).text_encoder.state_dict(), load_base_model(tiny_sd2_base_folder).text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)

    unsure = shutil.copytree(tiny_sd2_base_folder, tmp_path / "sd2-unsure")
    sched = unsure / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({k: v for k, v in json.loads(sched.read_text()).items() if k != "prediction_type"}))
    with pytest.raises(ModelLoadError, match="prediction_type: v_prediction"):
        load_base_model(unsure)

    sd1 = write_tiny_folder(tmp_path / "sd1-img2img", 0)
    index = json.loads((sd1 / "model_index.json").read_text())
    (sd1 / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    assert load_base_model(sd1).family.name == "sd15"
    unet_cfg = sd1 / "unet" / "config.json"
    unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), "in_channels": 9}))
    with pytest.raises(ModelLoadError, match="inpainting model"):
        load_base_model(sd1)


@pytest.mark.slow
def test_self_test_leaves_the_trained_networks_as_they_were(tmp_path, dataset, tiny_ckpt):
    """bf16 frozen weights: diffusers casts a text encoder to them when it loads the checked adapter; the trained
    fp32 LoRA and the train/eval modes must come back, and the file must pass (not 'off by 1 %')."""
    from safetensors.torch import load_file

    from lora_scripts.training.loop import fit
    from lora_scripts.training.trainer import Trainer

    tr = Trainer(load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=2, train_text_encoder=True,
                                         mixed_precision="bf16", save_precision="fp32", learning_rate=1e-3))).setup()
    result = fit(tr)
    assert "0 unmatched" in result.verified
    lora = [p for net in tr.trained.values() for n, p in net.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    saved = load_file(str(result.diffusers_path)) if result.diffusers_path else None
    states = tr.lora_states()
    from lora_scripts.formats.kohya import peft_to_kohya

    written = load_file(str(result.lora_path))
    kohya = peft_to_kohya(states, {c: 16.0 for c in states})
    assert all(torch.equal(written[k], kohya[k]) for k in kohya if not k.endswith(".alpha")), saved


def test_check_says_what_training_would_refuse_about_an_sd2_base(tmp_path, dataset, tiny_sd2_ckpt):
    """check reports the missing prediction_type (train refuses at once) and a resolution below a real model's."""
    from safetensors.torch import save_file

    from lora_scripts.data.check import check_dataset

    unsure = tmp_path / "v2-1.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}, str(unsure))
    report = check_dataset(load_config(seed_config(tmp_path, unsure)))
    assert [f.message for f in report.findings if f.level == "error"] == [
        "base_model is a Stable Diffusion 2.x file that does not say whether it predicts epsilon (512-base) or v "
        "(768-v): set prediction_type: epsilon or prediction_type: v_prediction"]
    told = check_dataset(load_config(seed_config(tmp_path, unsure, prediction_type="v_prediction")))
    assert told.ok and any("trained at 768 px" in f.message for f in told.findings)
    tiny = check_dataset(load_config(seed_config(tmp_path, tiny_sd2_ckpt)))  # a model of its own size: no advice
    assert tiny.ok and not any("trained at" in f.message for f in tiny.findings)
