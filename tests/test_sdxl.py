"""SDXL as a trainable family (issue 18): loading the SGM single file and the diffusers folder alike, detection of
what is not an SDXL base, the size conditioning from each crop, the file sd-scripts would write, and the same
outputs in diffusers as the trained networks. Resume and DDP run for SDXL through conftest.BASES."""

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_images, seed_config, write_dataset
from lora_scripts.config import load_config
from lora_scripts.data.images import fit_and_place, placement
from lora_scripts.errors import ModelLoadError
from lora_scripts.families import FAMILIES, FAMILY_KEY, LoadSettings, detect_family, detect_folder_family
from lora_scripts.families.loading import ARCHITECTURE_KEY, load_base_model
from lora_scripts.interop.lora_file import read_lora
from lora_scripts.interop.table import module_table
from lora_scripts.training.loop import train

GOLDEN = Path(__file__).parent / "golden"
SDXL = FAMILIES["sdxl"]


def test_single_file_loads_exactly_as_the_folder(tiny_sdxl_ckpt, tiny_sdxl_folder):
    a, b = load_base_model(tiny_sdxl_ckpt), load_base_model(tiny_sdxl_folder)
    assert a.family is b.family is SDXL and a.prediction_type == b.prediction_type == "epsilon"
    assert set(a.modules) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for name, module in a.modules.items():
        sa, sb = module.state_dict(), b.modules[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) == 0, name
        assert not [n for n, p in module.named_parameters() if p.device.type == "meta"]
    assert a.modules["text_encoder"].config.hidden_size == 32 and a.modules["text_encoder_2"].config.hidden_size == 64
    ids = SDXL.tokenize(a.tokenizers, ["a photo of a cat"])
    # CLIP-L pads with its end token, OpenCLIP-bigG with "!" (id 0): as SDXL was trained.
    assert ids["input_ids"][0, 7:].unique().tolist() == [49407] and ids["input_ids_2"][0, 7:].unique().tolist() == [0]


def test_encode_is_the_pipelines_own_prompt_encoding(tiny_sdxl_ckpt):
    """Penultimate layers of both encoders side by side and bigG's projected pooled output, exactly as
    StableDiffusionXLPipeline.encode_prompt computes them."""
    model = load_base_model(tiny_sdxl_ckpt)
    cond = SDXL.encode(model.text_encoders, SDXL.tokenize(model.tokenizers, ["a red circle"]), "cpu")
    pipe = SDXL.pipeline(model, model.schedule)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=False)
    assert cond.hidden.shape == (1, 77, 96) and torch.equal(cond.hidden, hidden)
    assert torch.equal(cond.extras["pooled"], pooled)


def _edit_tiny(src: Path, dst: Path, edit=None, add=None, drop_prediction_type=False) -> Path:
    state = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    if drop_prediction_type:  # as a real file: nothing in the metadata says what the model predicts
        configs = json.loads(meta[ARCHITECTURE_KEY])
        configs["scheduler"].pop("prediction_type")
        meta[ARCHITECTURE_KEY] = json.dumps(configs)
    state = {k: v for k, v in state.items() if edit is None or edit(k) is not None}
    state.update(add or {})
    save_file(state, str(dst), metadata=meta)
    return dst


def test_detection_table(tiny_sdxl_ckpt, tmp_path):
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tiny_sdxl_ckpt)).items()}
    assert detect_family(shapes) == "sdxl"
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in shapes.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(ModelLoadError, match="SDXL refiner"):
        detect_family(refiner, "refiner.safetensors")
    inpaint = dict(shapes, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)})
    with pytest.raises(ModelLoadError, match="inpainting"):
        detect_family(inpaint)
    half = {k: v for k, v in shapes.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(ModelLoadError, match="incomplete"):
        detect_family(half)
    # v-prediction fine-tunes say so with marker keys (NoobAI-XL v-pred: v_pred and ztsnr).
    plain = _edit_tiny(tiny_sdxl_ckpt, tmp_path / "plain.safetensors", drop_prediction_type=True)
    marked = _edit_tiny(tiny_sdxl_ckpt, tmp_path / "vpred.safetensors", drop_prediction_type=True,
                        add={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    assert load_base_model(plain).prediction_type == "epsilon"
    model = load_base_model(marked)
    assert model.prediction_type == "v_prediction" and "'v_pred' key" in model.objective_reason
    assert model.schedule.alphas_cumprod[-1] == 0 and "zero terminal SNR" in model.objective_reason
    user = load_base_model(marked, LoadSettings(prediction_type="epsilon"))  # the user can always set it
    assert user.prediction_type == "epsilon" and user.schedule.alphas_cumprod[-1] > 0
    said_v = load_base_model(marked, LoadSettings(prediction_type="v_prediction"))  # as sd-scripts' --v_parameterization
    assert said_v.schedule.alphas_cumprod[-1] == 0 and "'ztsnr' key" in said_v.objective_reason
    # ztsnr counts only beside v_pred, as ComfyUI reads it: alone it changes nothing (and is no error).
    lone = _edit_tiny(tiny_sdxl_ckpt, tmp_path / "ztsnr.safetensors", drop_prediction_type=True,
                      add={"ztsnr": torch.tensor([])})
    assert load_base_model(lone).schedule.alphas_cumprod[-1] > 0
    for key in ("edm_mean", "edm_vpred.sigma_max"):  # Playground v2.5, CosXL: another noise schedule
        with pytest.raises(ModelLoadError, match="EDM-schedule model"):
            detect_family(dict(shapes, **{key: (1,)}))
    unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ModelLoadError, match="SDXL UNet without its text encoders"):
        detect_family(unet_only)


def test_a_file_missing_a_weight_is_refused_not_left_on_meta(tiny_sdxl_ckpt, tmp_path):
    """diffusers' single-file loader leaves a missing text_projection or layer on the meta device and carries on."""
    cut = _edit_tiny(tiny_sdxl_ckpt, tmp_path / "cut.safetensors",
                     edit=lambda k: None if k == "conditioner.embedders.1.model.text_projection" else k)
    with pytest.raises(ModelLoadError, match="lacks .* text_encoder_2 weights .*incomplete"):
        load_base_model(cut)


def test_folder_detection_table(tiny_sdxl_folder, tmp_path):
    assert detect_folder_family(tiny_sdxl_folder) == "sdxl"
    index = json.loads((tiny_sdxl_folder / "model_index.json").read_text())
    for case, edit in (("refiner", lambda i, c: (i.update(text_encoder=[None, None]), c.pop("text_encoder"))),
                       ("inpainting", lambda i, c: c["unet"].update(in_channels=9))):
        folder = tmp_path / case
        configs = {n: json.loads((tiny_sdxl_folder / n / "config.json").read_text())
                   for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
        idx = dict(index, _class_name="StableDiffusionXLImg2ImgPipeline")
        edit(idx, configs)
        for name, cfg in configs.items():
            (folder / name).mkdir(parents=True)
            (folder / name / "config.json").write_text(json.dumps(cfg))
        (folder / "model_index.json").write_text(json.dumps(idx))
        with pytest.raises(ModelLoadError, match="refiner" if case == "refiner" else "inpainting"):
            detect_folder_family(folder)


def test_a_folder_s_own_zero_snr_schedule_is_stated_never_slipped_in(tiny_sdxl_folder, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_sdxl_folder, tmp_path / "zsnr")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, rescale_betas_zero_snr=True, prediction_type="v_prediction")))
    model = load_base_model(folder)
    assert model.schedule.alphas_cumprod[-1] == 0 and "rescale_betas_zero_snr" in model.objective_reason
    eps = load_base_model(folder, LoadSettings(prediction_type="epsilon"))  # never epsilon at SNR 0
    assert eps.schedule.alphas_cumprod[-1] > 0
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(cfg, _class_name="EDMEulerScheduler")))
    with pytest.raises(ModelLoadError, match="EDM-schedule model"):
        detect_folder_family(folder)


def test_a_diffusers_layout_sdxl_lora_without_cross_attention_k_keeps_its_sgm_names(tmp_path):
    """A UNet-only qv LoRA has no attn2.to_k; its to_v width or its metadata tells the family."""
    from lora_scripts.interop.lora_file import read_lora

    path = tmp_path / "qv.safetensors"
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": torch.zeros(4, 96),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight": torch.zeros(32, 4)},
              str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert list(read_lora(path).modules) == ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v"]


def test_placement_is_the_real_crop_and_follows_the_flip():
    """Original size, crop top-left in the scaled image, target size: the numbers of the crop really taken."""
    rng = random.Random(3)
    im = Image.fromarray(torch.randint(0, 255, (800, 1200, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy())
    crop, place = fit_and_place(im, (512, 512), None)
    assert place.ids().tolist() == [800, 1200, 0, 128, 512, 512]  # centred: (768 - 512) / 2 from the left
    assert place.flipped().ids().tolist() == [800, 1200, 0, 128, 512, 512]
    assert placement((1200, 800), (640, 384)).ids().tolist() == [800, 1200, 21, 0, 384, 640]
    crop, place = fit_and_place(im, (512, 512), random.Random(3))
    top, left = place.crop_top_left
    scaled = im.resize((768, 512), Image.Resampling.LANCZOS)
    assert left != 128 and crop.tobytes() == scaled.crop((left, top, left + 512, top + 512)).tobytes()
    flipped = place.flipped()
    mirror = scaled.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    f_left = flipped.crop_top_left[1]
    # The flipped crop is the mirrored image cut at the flipped offset.
    assert crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes() == mirror.crop((f_left, top, f_left + 512, top + 512)).tobytes()
    assert placement((1200, 800), (512, 512), random.Random(3)) == place
    assert placement((1200, 800), (512, 512), rng, flip=True) == flipped


def test_dataset_items_carry_their_placement_cached_or_not(tmp_path, tiny_ckpt):
    from lora_scripts.data.cache import LatentCache
    from lora_scripts.data.dataset import LoraDataset, build_items
    from lora_scripts.data.scan import scan_dataset

    folder = tmp_path / "data" / "sci_lab_train"
    for name in make_images(folder, 3, size=(96, 64)):
        (folder / name).with_suffix(".txt").write_text("a lab")
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, resolution=64, bucket_reso_steps=32, flip_aug=True,
                                  metadata_path=None, enable_bucket=False))
    items = build_items(scan_dataset(cfg), cfg)
    plain = LoraDataset(items, cfg)

    class Cache(LatentCache):  # the cached path reads no pixels: only the placement is compared here
        def get(self, item, flip):
            return type("C", (), {"mean": torch.zeros(1), "logvar": torch.zeros(1)})

    cached = LoraDataset(items, cfg, Cache("x"))
    for epoch in range(4):
        for i in range(len(items)):
            a, b = plain[(i, epoch)], cached[(i, epoch)]
            assert a["placement"].tolist() == b["placement"].tolist()
            assert a["placement"].tolist() in ([64, 96, 0, 16, 64, 64],)  # centred either way: 96 - 64 = 32


def test_kohya_names_from_the_family_equal_sd_scripts_lists_and_resolve_in_the_real_sgm_file():
    configs = SDXL.embedded_configs()
    modules = SDXL.meta_modules(configs)
    names = {c: sorted(SDXL.kohya_name(c, m) for m in SDXL.target_modules(c, modules[c], "kohya"))
             for c in ("unet", "text_encoder", "text_encoder_2")}
    assert names["unet"] == (GOLDEN / "sdxl_kohya_unet.txt").read_text().split()
    assert sorted(names["text_encoder"] + names["text_encoder_2"]) == (GOLDEN / "sdxl_kohya_te.txt").read_text().split()
    sgm = SDXL.ldm_state_dict(modules)  # the real SGM key set, on the meta device
    table = module_table({**configs, FAMILY_KEY: "sdxl"})
    for name in sum(names.values(), []):
        entry = table[name]
        assert tuple(sgm[entry.ldm_key].shape) == entry.ldm_shape, name
    q = table["lora_te2_text_model_encoder_layers_31_self_attn_v_proj"]
    assert q.ldm_key == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" and q.rows == (2560, 3840)


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_sdxl_ckpt):
    """UNet and both text encoders trained, previews on, diffusers file too; alpha != rank."""
    root = tmp_path_factory.mktemp("sdxl")
    write_dataset(root)
    cfg = load_config(seed_config(root, tiny_sdxl_ckpt, max_train_steps=4, lora_rank=4, lora_alpha=2,
                                  learning_rate=5e-3, train_text_encoder=True, text_encoder_lr=1e-3,
                                  text_encoder_2_lr=5e-4, save_precision="fp32", save_format="diffusers",
                                  sample_prompts=["a lab"], sample_every_n_steps=2, sample_steps=2,
                                  validation_split=0.25, validate_every_n_steps=2))
    return train(cfg), cfg


def test_the_file_has_sd_scripts_sdxl_names_and_metadata(sdxl_run):
    result, cfg = sdxl_run
    assert result.verified and "0 unmatched" in result.verified
    lora = read_lora(result.lora_path)
    prefixes = {n.split("_")[1] if n.startswith("lora_te") else "_".join(n.split("_")[2:4]) for n in lora.modules}
    assert prefixes == {"te1", "te2", "input_blocks", "middle_block", "output_blocks"}  # never diffusers-style names
    assert len(lora.modules) == 192 + 3 * 6 + 10 * 6
    meta = lora.metadata
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_enable_bucket"] == "True"
    assert list((cfg.output_dir / "samples").glob("*.png"))
    diffusers_file = read_lora(cfg.output_dir / "pytorch_lora_weights.safetensors")
    assert diffusers_file.format == "diffusers" and set(diffusers_file.modules) == set(lora.modules)


@torch.no_grad()
def _unet_and_text(pipe, placement):
    prompt, _, pooled, _ = pipe.encode_prompt("a lab, neon", device="cpu", do_classifier_free_guidance=False)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    added = {"text_embeds": pooled, "time_ids": placement}
    return prompt, pooled, pipe.unet(sample, torch.tensor([500]), prompt, added_cond_kwargs=added).sample


def test_diffusers_applies_every_key_and_gives_the_lora_s_own_outputs(sdxl_run, tiny_sdxl_ckpt, caplog):
    """The kohya file through diffusers' loader equals the base with each module's up @ down * alpha / rank added
    to its weight by hand (q/k/v of bigG included); the diffusers-layout file gives the same."""
    result, cfg = sdxl_run
    placement = torch.tensor([[48.0, 64.0, 0.0, 8.0, 32.0, 32.0]])
    model = load_base_model(tiny_sdxl_ckpt)
    pipe = SDXL.pipeline(model, model.schedule)
    with caplog.at_level(logging.INFO):
        pipe.load_lora_weights(str(result.lora_path), adapter_name="x")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    loaded = _unet_and_text(pipe, placement)

    manual = load_base_model(tiny_sdxl_ckpt)
    table = module_table({**json.loads(_meta(tiny_sdxl_ckpt)[ARCHITECTURE_KEY]), FAMILY_KEY: "sdxl"})
    with torch.no_grad():
        for name, m in read_lora(result.lora_path).modules.items():
            layer = manual.modules[table[name].component].get_submodule(table[name].path)
            layer.weight += m.delta().reshape(layer.weight.shape)
    baked = _unet_and_text(SDXL.pipeline(manual, manual.schedule), placement)
    for got, want in zip(loaded, baked):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    plain = _unet_and_text(SDXL.pipeline(load_base_model(tiny_sdxl_ckpt), manual.schedule), placement)
    assert (loaded[2] - plain[2]).abs().max() > 1e-4  # the LoRA does change the output

    other = SDXL.pipeline(load_base_model(tiny_sdxl_ckpt), manual.schedule)
    other.load_lora_weights(str(cfg.output_dir / "pytorch_lora_weights.safetensors"), adapter_name="y")
    for got, want in zip(_unet_and_text(other, placement), baked):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_each_component_learns_at_its_own_rate(tmp_path, dataset, tiny_sdxl_ckpt):
    from lora_scripts.training.trainer import Trainer

    cfg = load_config(seed_config(tmp_path, tiny_sdxl_ckpt, train_text_encoder=True, text_encoder_lr=1e-4,
                                  text_encoder_2_lr=3e-5))
    trainer = Trainer(cfg)
    trainer.check_data()
    trainer.model = trainer.setup_model()
    trainer.setup_loader(trainer.model)
    trainer.setup_optimizer(trainer.model)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [2e-4, 1e-4, 3e-5]
    batch = next(iter(trainer.loader))
    assert batch["placement"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4


def test_memory_estimate_for_sdxl_at_1024(tmp_path, tiny_sdxl_ckpt):
    """The real SDXL at 1024 px, bf16, batch 1: latents and both encoders' outputs cached, gradient checkpointing:
    under 7 GB (kohya documents 8 GB as its minimum); what each choice costs is in docs/benchmarks.md."""
    from lora_scripts.config import TrainConfig
    from lora_scripts.training.memory import estimate_memory

    (tmp_path / "data").mkdir()
    configs = {**SDXL.embedded_configs(), FAMILY_KEY: "sdxl"}
    base = dict(train_data_dir=tmp_path / "data", base_model=tiny_sdxl_ckpt, output_dir=tmp_path / "out",
                resolution=1024, mixed_precision="bf16", batch_size=1, gradient_checkpointing=True)
    lean = estimate_memory(TrainConfig.model_validate(base), configs)
    assert 5.5 < lean.total_gb < 7.0
    assert lean.weights / 2**30 == pytest.approx(2.567e9 * 2 / 2**30, rel=0.01)  # the UNet alone stays on the GPU
    full = estimate_memory(TrainConfig.model_validate(dict(base, gradient_checkpointing=False, train_text_encoder=True)), configs)
    assert full.total_gb > 2 * lean.total_gb and full.weights > lean.weights


def test_init_writes_1024_for_an_sdxl_base(tmp_path, tiny_sdxl_ckpt):
    import yaml

    from lora_scripts.cli import main

    make_images(tmp_path / "set", 4, size=(1200, 1600))
    assert main(["init", str(tmp_path / "set"), "--base", str(tiny_sdxl_ckpt), "--output", str(tmp_path / "x.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "x.yaml").read_text())["resolution"] == 1024


def test_convert_both_ways_and_merge_into_the_sgm_checkpoint(sdxl_run, tiny_sdxl_ckpt, tmp_path):
    """kohya -> diffusers -> kohya is bit-identical (SGM names rebuilt from the diffusers paths); the LoRA baked
    into the SGM file keeps its layout, dtype and metadata and gives the outputs of the LoRA applied at run time."""
    from lora_scripts.cli import main

    result, _ = sdxl_run
    d, k = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert main(["convert", str(result.lora_path), str(d), "--to", "diffusers", "--base", str(tiny_sdxl_ckpt)]) == 0
    assert main(["convert", str(d), str(k), "--to", "kohya"]) == 0
    src, back = load_file(str(result.lora_path)), load_file(str(k))
    assert set(src) == set(back) and all(torch.equal(src[n], back[n]) for n in src)
    assert any(n.startswith("text_encoder_2.") for n in load_file(str(d)))

    baked = tmp_path / "baked.safetensors"
    assert main(["merge", "--base", str(tiny_sdxl_ckpt), "--lora", f"{result.lora_path}:0.7", "--out", str(baked)]) == 0
    with safe_open(str(baked), "pt") as f, safe_open(str(tiny_sdxl_ckpt), "pt") as g:
        assert set(f.keys()) == set(g.keys()) and f.metadata()[ARCHITECTURE_KEY] == g.metadata()[ARCHITECTURE_KEY]
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {g.get_slice(k).get_dtype() for k in g.keys()}
    placement = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    live_model = load_base_model(tiny_sdxl_ckpt)
    live = SDXL.pipeline(live_model, live_model.schedule)
    live.load_lora_weights(str(result.lora_path), adapter_name="x")
    live.set_adapters(["x"], [0.7])
    merged = load_base_model(baked)
    for got, want in zip(_unet_and_text(SDXL.pipeline(merged, merged.schedule), placement), _unet_and_text(live, placement)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_generate_with_two_loras_a_sweep_and_compare(sdxl_run, tiny_sdxl_ckpt, tmp_path):
    """The SDXL pipeline draws at the requested size (its size ids follow it) with several <lora:…> at their own
    strengths; a sweep and compare run on the SDXL run folder."""
    from lora_scripts.cli import main

    result, cfg = sdxl_run
    lora = result.lora_path
    assert main(["resize", str(lora), str(tmp_path / "small.safetensors"), "--rank", "2"]) == 0
    out = tmp_path / "gen"
    assert main(["generate", "--base", str(tiny_sdxl_ckpt), "--prompt", f"a lab <lora:{lora.stem}:0.8> <lora:small:0.5>",
                 "--lora-dir", str(lora.parent), "--lora-dir", str(tmp_path), "--steps", "2", "--size", "48x32",
                 "--sweep", "0,1", "--out", str(out)]) == 0
    images = sorted(out.glob("*.png"))
    assert images and all(Image.open(p).size == (48, 32) for p in images if "sweep" not in p.name)
    assert main(["compare", str(cfg.output_dir), "--prompt", "a lab", "--steps", "2", "--size", "32x32",
                 "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").is_file()
