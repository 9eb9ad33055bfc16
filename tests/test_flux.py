"""Flux.1 (issue 19): separate files and diffusers folders load alike; the BFL layout matches diffusers' own
converter; the flow-matching objective; fused-q/k/v export exact and read by diffusers at the real width;
names as sd-scripts/ComfyUI resolve them at the real size; a tiny end-to-end run whose files load in diffusers
with the trained model's output. Resume and DDP run for Flux through conftest.TRAIN_BASES."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import flux_keys, seed_config
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError, ModelLoadError
from lora_scripts.families import FAMILIES, LoadSettings
from lora_scripts.families.detect import detect_family, detect_folder_family
from lora_scripts.families.flow_matching import FlowMatchingObjective, flux_mu
from lora_scripts.families.loading import load_base_model
from lora_scripts.families.t5_tokenizer import find_t5_tokenizer
from lora_scripts.formats import flux as bfl
from lora_scripts.formats.kohya import peft_to_kohya, split_kohya

FLUX = FAMILIES["flux1"]
GOLDEN = Path(__file__).parent / "golden"


def _settings(files, **kw):
    return LoadSettings(files={k: files[k] for k in ("clip_l", "t5xxl", "ae")}, tokenizer_dir=files["tokenizer_dir"], **kw)


def test_separate_files_load_equal_the_folder(tiny_flux_files, tiny_flux_folder):
    a = load_base_model(tiny_flux_files["base_model"], _settings(tiny_flux_files))
    b = load_base_model(tiny_flux_folder)
    assert a.family is b.family is FLUX and a.variant == b.variant == "dev"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = a.modules[name].state_dict(), b.modules[name].state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not any(p.device.type == "meta" for p in a.modules[name].parameters())
    captions = ["a photo of a cat, neon lighting", "sci lab"]
    ta, tb = FLUX.tokenize(a.tokenizers, captions), FLUX.tokenize(b.tokenizers, captions)
    assert {k: tuple(v.shape) for k, v in ta.items()} == {"input_ids": (2, 77), "t5_ids": (2, 512)}
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    cond = FLUX.encode(a.text_encoders, ta, "cpu")
    assert cond.hidden.shape == (2, 512, 48) and cond.extras["pooled"].shape == (2, 32)  # T5 48 wide, CLIP 32


def test_an_all_in_one_comfyui_checkpoint_loads_as_its_four_files(tmp_path, tiny_flux_files, flux_run):
    """ComfyUI's CheckpointSave layout (model.diffusion_model., text_encoders.clip_l/t5xxl.transformer., vae.):
    the same weights as the separate files; nothing else to name; a LoRA trained on the separate files verifies
    against it by name and effect; a file the config names replaces the embedded one."""
    from safetensors.torch import load_file

    from lora_scripts.interop.verify import verify

    with safe_open(str(tiny_flux_files["base_model"]), "pt") as f:
        metadata = f.metadata()
    state = {}
    for key, prefix in (("base_model", bfl.BFL_PREFIX), ("clip_l", "text_encoders.clip_l.transformer."),
                        ("t5xxl", "text_encoders.t5xxl.transformer."), ("ae", "vae.")):
        state.update({prefix + k.removeprefix(bfl.BFL_PREFIX): v for k, v in load_file(str(tiny_flux_files[key])).items()})
    aio = tmp_path / "flux1-dev-aio.safetensors"
    save_file(state, str(aio), metadata)
    a = load_base_model(aio, LoadSettings(tokenizer_dir=tiny_flux_files["tokenizer_dir"]))
    b = load_base_model(tiny_flux_files["base_model"], _settings(tiny_flux_files))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = a.modules[name].state_dict(), b.modules[name].state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert FLUX.companion_files(aio) == {}
    names = FLUX.base_shapes(aio)  # what a LoRA's names are checked against: the transformer's and CLIP-L's keys
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in names and "double_blocks.0.img_attn.qkv.weight" in names
    assert not any(k.startswith(("vae.", "text_encoders.")) for k in names)
    result, _ = flux_run
    report = verify(result.lora_path, aio)
    assert report.ok and report.modules > 0, report.summary()
    with pytest.raises(ConfigError, match="t5xxl = .*this is a CLIP text encoder"):  # the named file wins
        load_base_model(aio, LoadSettings(files={"t5xxl": tiny_flux_files["clip_l"]},
                                          tokenizer_dir=tiny_flux_files["tokenizer_dir"]))


def test_bfl_layout_is_the_inverse_of_diffusers_converter():
    """Our diffusers -> BFL map (naming LoRAs, writing test files) against diffusers' own BFL -> diffusers
    single-file converter, at the real width (1 double + 1 single block, on the meta device: keys and shapes),
    and values round-tripped at the tiny width."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = {**FLUX.embedded_configs()["transformer"], "num_layers": 1, "num_single_layers": 1}
    with torch.device("meta"):
        real = FluxTransformer2DModel.from_config(cfg).state_dict()
        theirs = convert_flux_transformer_checkpoint_to_diffusers(bfl.transformer_to_bfl(dict(real)))
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in real.items()}
    tiny = FLUX.build_modules({"transformer": {**cfg, **FLUX.tiny_sizes["transformer"]}})["transformer"].state_dict()
    back = bfl.bfl_to_transformer(bfl.transformer_to_bfl(tiny), 32)
    assert set(back) == set(tiny) and all(torch.equal(back[k], tiny[k]) for k in tiny)
    shapes = bfl.transformer_shapes_to_bfl({k: tuple(v.shape) for k, v in tiny.items()})
    assert shapes == {k: tuple(v.shape) for k, v in bfl.transformer_to_bfl(tiny).items()}


def test_flow_matching_objective():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    latents = torch.randn(3, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    obj = FlowMatchingObjective()
    a, b = obj.sample(latents, torch.Generator().manual_seed(5)), obj.sample(latents, torch.Generator().manual_seed(5))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timesteps, b.timesteps)  # a resumed run redraws the same
    s = a.timesteps.view(-1, 1, 1, 1)
    assert torch.allclose(a.noisy, (1 - s) * latents + s * a.noise)
    assert torch.equal(obj.target(a), a.noise - latents)
    # The resolution-dependent shift is FluxPipeline's: 32 x 32 tokens here (a 512 px image).
    assert flux_mu(32 * 32) == pytest.approx(calculate_shift(32 * 32))
    g = torch.Generator().manual_seed(5)
    torch.randn(latents.shape, generator=g)  # the noise is drawn first
    raw = torch.sigmoid(torch.randn(3, generator=g))  # the same sigma draw, unshifted
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    assert torch.allclose(a.timesteps, sched.time_shift(calculate_shift(32 * 32), 1.0, raw), atol=1e-6)
    g = torch.Generator().manual_seed(5)
    torch.randn(latents.shape, generator=g)
    fixed = FlowMatchingObjective("shift", discrete_flow_shift=3.0).sample_sigmas(latents, g)
    assert torch.allclose(fixed, 3 * raw / (1 + 2 * raw))
    assert (a.timesteps > raw).all()  # shifted towards noise at 1024 tokens (mu ~ 0.66)
    pred = torch.zeros_like(latents)
    per = ((pred - obj.target(a)) ** 2).mean(dim=(1, 2, 3))
    assert obj.loss(pred, a) == pytest.approx(float(per.mean()), rel=1e-5)
    weighted = FlowMatchingObjective(loss_weighting="sigma_sqrt").loss(pred, a)
    assert weighted == pytest.approx(float((per * compute_loss_weighting_for_sd3("sigma_sqrt", a.timesteps)).mean()), rel=1e-5)


def _random_states(module, targets, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in targets:
        layer = module.get_submodule(path)
        state[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g)
        state[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g)
    return state


@pytest.mark.parametrize("preset", ["kohya", "attn"])
def test_fused_export_reproduces_each_layers_delta(preset):
    """Stacked downs and block-diagonal ups (alpha x parts): the fused module's update is each layer's update in
    its rows (zero rows for a layer without LoRA: attn leaves a single block's MLP input out), to 1e-5; reading
    the kohya file back into per-layer LoRAs gives the trained ones."""
    from lora_scripts.interop.lora_file import LoraFile, LoraModule, diffusers_state

    net = FLUX.build_modules({"transformer": {**FLUX.embedded_configs()["transformer"],
                                              **FLUX.tiny_sizes["transformer"]}})["transformer"]
    targets = FLUX.target_modules("transformer", net, preset)
    state = _random_states(net, targets)
    kohya = peft_to_kohya({"transformer": state}, {"transformer": 3.0}, FLUX.kohya_name, None, FLUX.fused_slot)
    parts, unknown = split_kohya(kohya)
    assert not unknown
    table = FLUX.module_table({k: {**v, **FLUX.tiny_sizes.get(k, {})} for k, v in FLUX.embedded_configs().items()})
    for name, p in parts.items():
        entry = table[name]
        delta = p["up"] @ p["down"] * float(p["alpha"]) / p["down"].shape[0]
        layers = entry.parts or ((entry.path, entry.shape[0]),)
        rows = 0
        for path, n in layers:
            key = f"{path}.lora_A.weight"
            want = (state[f"{path}.lora_B.weight"] @ state[key] * 3.0 / 2) if key in state else torch.zeros(n, delta.shape[1])
            assert torch.allclose(delta[rows:rows + n], want, atol=1e-5), (name, path)
            rows += n
        assert rows == delta.shape[0]
    lora = LoraFile({n: LoraModule(p["down"], p["up"], float(p["alpha"])) for n, p in parts.items()})
    back, _ = diffusers_state(lora, table, torch.float32)
    assert set(back) == {f"transformer.{k}" for k in state}
    assert all(torch.equal(back[f"transformer.{k}"], v) for k, v in state.items())


def test_diffusers_reads_our_kohya_file_at_the_real_width():
    """diffusers' kohya Flux converter (what FluxPipeline.load_lora_weights runs on a kohya file) on our export of
    a real-width double and single block: every key is used, and each layer gets exactly its trained update."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    cfg = {**FLUX.embedded_configs()["transformer"], "num_layers": 1, "num_single_layers": 1}
    with torch.device("meta"):
        net = FluxTransformer2DModel.from_config(cfg)
    targets = FLUX.target_modules("transformer", net, "kohya")
    state = _random_states(net, targets, rank=2)
    kohya = peft_to_kohya({"transformer": state}, {"transformer": 1.0}, FLUX.kohya_name, None, FLUX.fused_slot)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    assert set(theirs) == {f"transformer.{k}" for k in state}
    for path in targets:
        a, b = theirs[f"transformer.{path}.lora_A.weight"], theirs[f"transformer.{path}.lora_B.weight"]
        mine = state[f"{path}.lora_B.weight"] @ state[f"{path}.lora_A.weight"] * 0.5  # alpha 1 / rank 2
        assert torch.allclose(b @ a, mine, atol=1e-4, rtol=1e-4), path


def test_kohya_names_at_the_real_size_are_comfyuis():
    """sd-scripts' default Flux targets (every Linear of the 19 double and 38 single blocks: 494 diffusers layers)
    become 304 kohya modules; each is `lora_unet_` + a weight key of flux1-dev.safetensors, which is the name
    ComfyUI looks up (so none is "not loaded"). The list is pinned in tests/golden."""
    configs = FLUX.embedded_configs()
    net = FLUX.meta_modules({"transformer": configs["transformer"]})["transformer"]
    targets = FLUX.target_modules("transformer", net, "kohya")
    names = sorted({FLUX.kohya_name("transformer", t) for t in targets})
    assert (len(targets), len(names)) == (494, 304)
    bfl_keys = bfl.transformer_shapes_to_bfl({k: tuple(v.shape) for k, v in net.state_dict().items()})
    comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in bfl_keys if k.endswith(".weight")}
    assert set(names) <= comfy
    assert names == (GOLDEN / "flux1_kohya_unet.txt").read_text().split()
    table = FLUX.module_table(configs)
    assert all(table[n].ldm_key in bfl_keys and tuple(bfl_keys[table[n].ldm_key]) == table[n].shape for n in names)
    assert table["lora_unet_single_blocks_0_linear1"].parts == (
        ("single_transformer_blocks.0.attn.to_q", 3072), ("single_transformer_blocks.0.attn.to_k", 3072),
        ("single_transformer_blocks.0.attn.to_v", 3072), ("single_transformer_blocks.0.proj_mlp", 12288))
    te = FLUX.meta_modules({"text_encoder": configs["text_encoder"], "transformer": configs["transformer"]})
    te_names = {FLUX.kohya_name("text_encoder", t) for t in FLUX.target_modules("text_encoder", te["text_encoder"], "kohya")}
    assert len(te_names) == 72 and "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te_names


def test_variants_and_foreign_files_are_named(tmp_path, tiny_flux_files):
    base = {bfl.BFL_PREFIX + bfl.KOHYA_PREFIX: (1,)}  # filler
    marker = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}
    assert detect_family({**marker, "img_in.weight": (3072, 64)}) == "flux1"
    assert detect_family({bfl.BFL_PREFIX + k: v for k, v in marker.items()}) == "flux1"
    with pytest.raises(ModelLoadError, match="Fill"):
        detect_family({**marker, "img_in.weight": (3072, 384)})
    with pytest.raises(ModelLoadError, match="Depth or Canny"):
        detect_family({**marker, "img_in.weight": (3072, 128)})
    with pytest.raises(ModelLoadError, match="Flux.2"):
        detect_family({"single_stream_modulation.lin.weight": (1, 1), **base})
    with pytest.raises(ModelLoadError, match="Chroma"):
        detect_family({"distilled_guidance_layer.in_proj.bias": (1,), **marker})
    folder = tmp_path / "kontext"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    with pytest.raises(ModelLoadError, match="Kontext"):
        detect_folder_family(folder)
    with pytest.raises(ModelLoadError, match="Kontext .* by its name"):  # dev's keys: only the name tells
        detect_family({**marker, "img_in.weight": (3072, 64)}, "models/flux1-kontext-dev.safetensors")
    # Separate files: each must be the kind its key names, and none may be missing.
    files = dict(tiny_flux_files)
    with pytest.raises(ConfigError, match=r"t5xxl: required .*T5-XXL"):
        load_base_model(files["base_model"], LoadSettings(files={"clip_l": files["clip_l"], "ae": files["ae"]}))
    swapped = LoadSettings(files={"clip_l": files["t5xxl"], "t5xxl": files["clip_l"], "ae": files["base_model"]},
                           tokenizer_dir=files["tokenizer_dir"])
    with pytest.raises(ConfigError) as err:
        load_base_model(files["base_model"], swapped)
    text = str(err.value)
    assert "clip_l = " in text and "this is a T5 text encoder" in text and "this is a CLIP text encoder" in text
    assert "ae = " in text and "a Flux transformer" in text
    with pytest.raises(ConfigError, match="prediction_type"):
        load_base_model(files["base_model"], _settings(files, prediction_type="v_prediction"))
    for key in ("clip_l", "t5xxl", "ae"):  # one of the other files given as base_model: named, with the fix
        with pytest.raises(ModelLoadError, match=f"one of Flux.1's separate files, not a base model: set {key} to it"):
            load_base_model(files[key], LoadSettings())


def test_schnell_is_told_by_its_weights(tmp_path):
    from lora_scripts.families.tiny import write_tiny_flux_files

    files = write_tiny_flux_files(tmp_path, seed=1, guidance_embeds=False)
    model = load_base_model(files["base_model"], _settings(files))
    assert model.variant == "schnell" and model.predict_options == {"guidance": None}
    assert model.tokenizers["tokenizer_2"].model_max_length == 256  # schnell was distilled at 256 T5 tokens
    assert FLUX.lora_metadata("flow", model.variant)["modelspec.architecture"] == "flux-1-schnell/lora"


def test_t5_tokenizer_is_found_where_users_have_it(tmp_path, monkeypatch, tiny_flux_files):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = tiny_flux_files["tokenizer_dir"]
    comfy = tmp_path / "ComfyUI"
    model = comfy / "models" / "diffusion_models" / "flux1-dev.safetensors"
    model.parent.mkdir(parents=True)
    with pytest.raises(ModelLoadError) as err:
        find_t5_tokenizer(None, None, [model])
    assert "tokenizer_dir" in str(err.value) and "t5_tokenizer" in str(err.value)
    shutil.copytree(source, comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    assert find_t5_tokenizer(None, None, [model]) == comfy / "comfy" / "text_encoders" / "t5_tokenizer"
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "abc" / "tokenizer_2"
    shutil.copytree(source, snapshot)
    assert find_t5_tokenizer(None, None, []) == snapshot
    with pytest.raises(ModelLoadError, match="tokenizer_dir .* holds no T5 tokenizer"):
        find_t5_tokenizer(tmp_path, None, [])


def test_train_flux_files_end_to_end(tmp_path, dataset, tiny_flux_files):
    """ComfyUI-style files in, a kohya file out whose every name is a key of the transformer/clip_l files, which
    the self-test proves by name and effect; the diffusers file loads in FluxPipeline with every key applied and
    gives the trained networks' output."""
    from diffusers import FluxPipeline

    from lora_scripts.training.loop import fit
    from lora_scripts.training.trainer import Trainer

    cfg = load_config(seed_config(tmp_path, tiny_flux_files["base_model"], **flux_keys(tiny_flux_files), epochs=2,
                                  lora_rank=4, lora_alpha=2, train_text_encoder=True, save_format="diffusers",
                                  guidance_scale=3.5, timestep_sampling="shift", validation_split=0.25))
    trainer = Trainer(cfg).setup()
    result = fit(trainer)
    assert result.verified and math.isfinite(result.final_loss) and len(result.validation) == 2
    with safe_open(str(result.lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    names = {k.split(".")[0] for k in keys}
    assert len(names) == 2 * 10 + 2 * 3 + 2 * 6  # fused double/single blocks, CLIP-L's 2 layers x 6
    file_keys = FLUX.base_shapes(tiny_flux_files["base_model"], {"clip_l": tiny_flux_files["clip_l"]})
    assert all(n.removeprefix("lora_unet_").removeprefix("lora_te1_") in
               {k.removesuffix(".weight").replace(".", "_") for k in file_keys} for n in names)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_network_module"]) == (
        "flux1", "flux-1-dev/lora", "networks.lora_flux")
    assert meta["ss_guidance_scale"] == "3.5" and meta["ss_timestep_sampling"] == "shift"

    model = trainer.model
    trained = trainer.accelerator.unwrap_model(trainer.trained["transformer"]).eval()
    g = torch.Generator().manual_seed(0)
    latents, hidden, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, 48, generator=g), torch.randn(1, 32, generator=g)
    from lora_scripts.families import Conditioning

    cond, sigma = Conditioning(hidden, {"pooled": pooled}), torch.tensor([0.6])
    with torch.no_grad():
        want = FLUX.predict(trained, latents, sigma, cond, None, guidance=3.5)
    base = load_base_model(tiny_flux_files["base_model"], _settings(tiny_flux_files))
    with torch.no_grad():
        before = FLUX.predict(base.denoiser, latents, sigma, cond, None, guidance=3.5)
    pipe = FLUX.pipeline(base, base.schedule)
    assert isinstance(pipe, FluxPipeline)
    pipe.load_lora_weights(str(result.diffusers_path))
    with torch.no_grad():
        got = FLUX.predict(pipe.transformer, latents, sigma, cond, None, guidance=3.5)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, before, atol=1e-4)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux_files):
    """A short Flux run on the separate files, with a preview drawn at the end (transformer LoRA only)."""
    from conftest import write_dataset

    root = tmp_path_factory.mktemp("flux_run")
    write_dataset(root)
    cfg = load_config(seed_config(root, tiny_flux_files["base_model"], **flux_keys(tiny_flux_files), max_train_steps=2,
                                  lora_rank=4, save_precision="fp32", cache_text_encoder_outputs_to_disk=True,
                                  sample_prompts=["a photo of a cat, <lora:sci_lab_lora:0.8>"]))
    from lora_scripts.training.loop import train

    return train(cfg), root


def test_previews_generate_compare_verify_for_flux_files(flux_run, tiny_flux_files, tmp_path):
    """Previews during training, `generate` with a <lora:> tag, `compare` and `verify` on the CLI, all on the
    separate files; Flux.1-dev's sampling defaults (28 steps, guidance 3.5) where none are given."""
    from lora_scripts.cli import main
    from lora_scripts.generation.pnginfo import parse_parameters, read_parameters

    result, root = flux_run
    previews = sorted((result.output_dir / "samples").glob("*.png"))
    assert len(previews) == 1
    assert parse_parameters(read_parameters(previews[0]))["Steps"] == "28"
    cached = sorted((root / "data" / "sci_lab_train" / ".lora-scripts-cache").glob("text-*.safetensors"))
    assert len(cached) == 8  # T5 states (512 tokens: the tiny model is a dev) + CLIP-L pooled
    with safe_open(str(cached[0]), "pt") as f:
        assert f.get_slice("hidden").get_shape()[1] == 48 and f.get_slice("extras.pooled").get_shape() == [32]
    files = ["--clip-l", str(tiny_flux_files["clip_l"]), "--t5xxl", str(tiny_flux_files["t5xxl"]), "--ae",
             str(tiny_flux_files["ae"]), "--tokenizer-dir", str(tiny_flux_files["tokenizer_dir"])]
    out = tmp_path / "gen"
    assert main(["generate", "--base", str(tiny_flux_files["base_model"]), *files, "--prompt",
                 "a cat, <lora:sci_lab_lora:0.8>", "--lora-dir", str(result.output_dir), "--size", "32x32",
                 "--steps", "2", "--out", str(out)]) == 0
    info = parse_parameters(read_parameters(next(out.glob("*.png"))))
    assert info["Steps"] == "2" and info["CFG scale"] == "3.5" and info["Lora hashes"].startswith("sci_lab_lora: ")
    assert main(["compare", str(result.output_dir), "--prompt", "a cat", "--size", "32x32", "--steps", "2",
                 "--out", str(tmp_path / "cmp")]) == 0  # the run's own clip_l/t5xxl/ae
    assert (tmp_path / "cmp" / "compare.png").is_file()
    assert main(["verify", str(result.lora_path), "--base", str(tiny_flux_files["base_model"]), *files]) == 0


def test_inspect_convert_resize_merge_bake_flux_files(flux_run, tiny_flux_files, tmp_path):
    """The interop tools on a Flux kohya file: inspect names the family; kohya -> diffusers -> kohya is exact
    (fused q/k/v split into per-layer LoRAs and fused back); resize and merge keep the names; baking writes a
    transformer file in its own layout with the update added."""
    from lora_scripts.cli import main
    from lora_scripts.interop.describe import describe
    from lora_scripts.interop.files import convert_file
    from lora_scripts.interop.lora_file import read_lora

    result, _ = flux_run
    d = describe(result.lora_path)
    assert d.family == "flux1" and not d.warnings and set(d.blocks) == {"transformer.double_blocks",
                                                                         "transformer.single_blocks"}
    base = tiny_flux_files["base_model"]
    convert_file(result.lora_path, tmp_path / "d.safetensors", "diffusers", base)
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.transformer_blocks.") or k.startswith("transformer.single_transformer_blocks.")
                   for k in f.keys())
    convert_file(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya", base)
    a, b = read_lora(result.lora_path), read_lora(tmp_path / "k.safetensors")
    assert set(a.modules) == set(b.modules)
    assert all(torch.allclose(a.modules[n].delta(), b.modules[n].delta(), atol=1e-6) for n in a.modules)
    assert main(["resize", str(result.lora_path), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 0
    assert set(read_lora(tmp_path / "r.safetensors").modules) == set(a.modules)
    assert main(["merge", "--lora", f"{result.lora_path}:0.5", "--lora", f"{tmp_path / 'k.safetensors'}:0.5",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    merged = read_lora(tmp_path / "m.safetensors")
    n = "lora_unet_double_blocks_0_img_attn_qkv"
    assert torch.allclose(merged.modules[n].delta(), a.modules[n].delta(), atol=1e-5)
    assert main(["merge", "--lora", str(result.lora_path), "--base", str(base), "--out", str(tmp_path / "baked.safetensors")]) == 0
    with safe_open(str(base), "pt") as f0, safe_open(str(tmp_path / "baked.safetensors"), "pt") as f1:
        key = "double_blocks.0.img_attn.qkv.weight"
        assert set(f0.keys()) == set(f1.keys())
        assert torch.allclose(f1.get_tensor(key) - f0.get_tensor(key), a.modules[n].delta(), atol=1e-5)


def test_init_finds_the_other_flux_files_in_a_comfyui_tree(tmp_path, tiny_flux_files, dataset):
    from lora_scripts.init_config import starter_yaml

    models = tmp_path / "ComfyUI" / "models"
    for sub, key, name in (("diffusion_models", "base_model", "flux1-dev.safetensors"),
                           ("text_encoders", "clip_l", "clip_l.safetensors"),
                           ("text_encoders", "t5xxl", "t5xxl_fp16.safetensors")):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_flux_files[key], models / sub / name)
    text = starter_yaml(dataset, str(models / "diffusion_models" / "flux1-dev.safetensors"), tmp_path)
    assert "SET THIS: ae not found" in text and "clip_l: ComfyUI/models/text_encoders/clip_l.safetensors" in \
        text.replace("./", "")
    assert "t5xxl: ComfyUI/models/text_encoders/t5xxl_fp16.safetensors" in text.replace("./", "")
    assert "cache_text_encoder_outputs_to_disk: true" in text


def test_check_estimates_flux_memory_at_the_real_size(tmp_path, tiny_flux_files, dataset):
    """`check`'s estimate on the real Flux.1-dev configs (meta device): with the caches the transformer's bf16
    weights are all that stays (11.9 B x 2 bytes); the encoders only while captions are cached (T5-XXL 9.5 GB);
    gradient checkpointing cuts the activations."""
    from lora_scripts.families import FAMILY_KEY
    from lora_scripts.training.memory import estimate_memory

    real = {**FLUX.embedded_configs(), FAMILY_KEY: "flux1"}
    def estimate(**kw):
        cfg = load_config(seed_config(tmp_path, tiny_flux_files["base_model"], **flux_keys(tiny_flux_files),
                                      resolution=1024, batch_size=1, mixed_precision="bf16", **kw))
        return estimate_memory(cfg, real)

    low, high = estimate(gradient_checkpointing=True), estimate(gradient_checkpointing=False)
    assert low.weights == 11_901_408_320 * 2
    assert low.caching > (4_762_310_656 + 123_060_480) * 2
    assert 0 < low.activations < high.activations / 10


def test_check_counts_caption_tokens_as_t5_reads_them(tmp_path, tiny_flux_files, dataset):
    """Flux reads captions with T5 (dev: 511 tokens and its end token), not in CLIP's 75-token windows: a caption
    of 100 words is read whole; with max_sequence_length 64 the warning names T5's limit and the key to raise."""
    from conftest import write_metadata
    from lora_scripts.data.check import check_dataset

    names = sorted(p.name for p in dataset.glob("*.png"))
    long = ", ".join(["glowing consoles in a sci lab"] * 17)  # 102 words
    write_metadata(dataset / "metadata.csv", [(n, long if i < 2 else f"sci lab {i}, neon") for i, n in enumerate(names)])

    def caption_warnings(**kw):
        cfg = load_config(seed_config(tmp_path, tiny_flux_files["base_model"], **flux_keys(tiny_flux_files), **kw))
        return [f.message for f in check_dataset(cfg).findings if "tokens" in f.message and "reads" in f.message]

    assert caption_warnings() == []
    (warning,) = caption_warnings(max_sequence_length=64)
    assert warning.startswith("2 captions are longer than the 63 tokens T5 reads") and \
        warning.endswith("or set max_sequence_length: 512 to read up to 511 tokens"), warning


def test_images_are_drawn_with_the_t5_length_training_used():
    """FluxPipeline pads prompts to 512 T5 tokens unless told; previews and `generate` pass training's length
    (schnell 256, or the config's max_sequence_length), which every Flux pipeline we call takes."""
    import inspect
    from types import SimpleNamespace

    from diffusers import FluxControlNetPipeline, FluxPipeline

    from lora_scripts.families import FAMILIES, LoadSettings

    flux = FAMILIES["flux1"]

    def model(guided):
        return SimpleNamespace(denoiser=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guided)))

    assert flux.pipeline_options(model(True), LoadSettings()) == {"max_sequence_length": 512}
    assert flux.pipeline_options(model(False), LoadSettings()) == {"max_sequence_length": 256}
    assert flux.pipeline_options(model(True), LoadSettings(max_sequence_length=128)) == {"max_sequence_length": 128}
    assert FAMILIES["sd15"].pipeline_options(model(True), LoadSettings()) == {}
    for pipeline in (FluxPipeline, FluxControlNetPipeline):
        assert "max_sequence_length" in inspect.signature(pipeline.__call__).parameters
