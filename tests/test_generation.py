"""Generation with <lora:NAME:W> prompts, several LoRAs at once, PNG parameters, sweeps, comparisons, and the
previews and validation loss computed during training."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import seed_config, write_dataset
from lora_scripts.cli import main
from lora_scripts.config import load_config
from lora_scripts.errors import ConfigError, LoraScriptsError
from lora_scripts.interop.table import base_configs, module_table
from lora_scripts.generation.lora_lookup import index_loras, resolve
from lora_scripts.generation.pnginfo import parse_parameters, read_parameters
from lora_scripts.generation.render import Renderer, Settings
from lora_scripts.generation.sweeps import strength_sweep
from lora_scripts.training.loop import train

FAST = Settings(steps=3, cfg=5.0, scheduler="ddim")


def _random_lora(path, base, seed, targets=("attn1_to_q", "attn2_to_v")):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, e in module_table(base_configs(base)).items():
        if e.component == "unet" and name.endswith(targets):
            out_f, in_f = e.shape[0], e.shape[1]
            state[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.5
            state[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.5
            state[f"{name}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("loras")
    _random_lora(root / "output" / "style_a" / "style_a.safetensors", tiny_ckpt, 1)
    _random_lora(root / "models" / "Lora" / "subject_b.safetensors", tiny_ckpt, 2, targets=("attn2_to_k", "ff_net_2"))
    # A run folder's checkpoints repeat the final file's name: they must not shadow it.
    _random_lora(root / "output" / "style_a" / "checkpoints" / "step-2" / "style_a.safetensors", tiny_ckpt, 9)
    return root, [root / "output", root / "models" / "Lora"]


def _pixels(rendered):
    return np.asarray(rendered[0].image, dtype=np.int16)


def test_names_resolve_in_output_and_a1111_folders(loras):
    root, dirs = loras
    index = index_loras(dirs)
    assert index["style_a"] == root / "output" / "style_a" / "style_a.safetensors"
    assert index["subject_b"] == root / "models" / "Lora" / "subject_b.safetensors"
    with pytest.raises(LoraScriptsError, match="Did you mean: style_a"):
        resolve("style_aa", index, dirs)


def test_two_loras_each_have_their_effect_and_weight_zero_is_the_base(loras, tiny_ckpt):
    _, dirs = loras
    r = Renderer(tiny_ckpt, dirs, FAST)
    base = _pixels(r.render("a red circle", [7]))
    a = _pixels(r.render("a red circle, <lora:style_a:1>", [7]))
    b = _pixels(r.render("a red circle, <lora:subject_b:1>", [7]))
    both = _pixels(r.render("a red circle, <lora:style_a:1>, <lora:subject_b:1>", [7]))
    zero = _pixels(r.render("a red circle, <lora:style_a:0>, <lora:subject_b:0>", [7]))
    again = _pixels(r.render("a red circle, <lora:style_a:1>, <lora:subject_b:1>", [7]))
    for x, y in ((a, base), (b, base), (both, a), (both, b)):
        assert np.abs(x - y).mean() > 1.0
    assert np.array_equal(zero, base)  # strength 0 is the base, pixel for pixel
    assert np.array_equal(again, both)  # deterministic for a seed


def test_a_lora_file_trained_again_is_reloaded(tiny_ckpt, tmp_path):
    """A long-lived renderer (the web UI's) must not keep drawing with a file's old weights, or its old hash."""
    import os

    path = _random_lora(tmp_path / "output" / "run" / "run.safetensors", tiny_ckpt, 1)
    r = Renderer(tiny_ckpt, [tmp_path / "output"], FAST)
    first = r.render("a red circle, <lora:run:1>", [7])
    _random_lora(path, tiny_ckpt, 5)
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 5))  # a later write, even on coarse clocks
    second = r.render("a red circle, <lora:run:1>", [7])
    fresh = Renderer(tiny_ckpt, [tmp_path / "output"], FAST).render("a red circle, <lora:run:1>", [7])
    assert np.array_equal(_pixels(second), _pixels(fresh)) and not np.array_equal(_pixels(first), _pixels(second))
    assert second[0].params.lora_hashes != first[0].params.lora_hashes


def test_generate_writes_pngs_whose_parameters_a1111_reads(loras, tiny_ckpt, tmp_path):
    _, dirs = loras
    args = ["generate", "--base", str(tiny_ckpt), "--prompt", "a lab, <lora:style_a:0.8>", "--n", "2", "--seed", "5",
            "--steps", "3", "--scheduler", "ddim", "--size", "64x64", "--negative", "blurry", "--out", str(tmp_path)]
    for d in dirs:
        args += ["--lora-dir", str(d)]
    assert main(args) == 0 and main(args) == 0  # the second run numbers on, overwriting nothing
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["00000-5.png", "00001-6.png", "00002-5.png", "00003-6.png"]
    info = parse_parameters(read_parameters(tmp_path / "00001-6.png"))
    assert info["prompt"] == "a lab, <lora:style_a:0.8>" and info["negative"] == "blurry"
    assert info["Seed"] == "6" and info["Steps"] == "3" and info["Sampler"] == "DDIM" and info["Size"] == "64x64"
    assert info["Model"] == tiny_ckpt.stem and len(info["Model hash"]) == 10
    assert info["Lora hashes"].startswith("style_a: ") and len(info["Lora hashes"].split(": ")[1]) == 12


def test_a_kohya_file_diffusers_cannot_read_draws_through_its_conversion(tiny_ckpt, tmp_path):
    """A valid text-encoder LoRA on q_proj/v_proj only: diffusers 0.42 refuses the kohya file ("Could not
    automatically infer state dict type"), A1111/ComfyUI load it. generate loads its exact diffusers-layout
    conversion instead (it used to stop with "convert it once"), and the LoRA changes the image."""
    from helpers.bad_cases_interop import te_only

    from lora_scripts.interop.files import convert_file

    te_only(tmp_path / "loras", tiny_ckpt)
    convert_file(tmp_path / "loras" / "te.safetensors", tmp_path / "conv" / "te_d.safetensors", "diffusers", tiny_ckpt)
    r = Renderer(tiny_ckpt, [tmp_path / "loras", tmp_path / "conv"], FAST)
    base = _pixels(r.render("a red circle", [7]))
    with_te = _pixels(r.render("a red circle, <lora:te:1>", [7]))
    assert np.abs(with_te - base).mean() > 0.1
    assert np.array_equal(with_te, _pixels(r.render("a red circle, <lora:te_d:1>", [7])))  # = the converted file
    assert np.array_equal(_pixels(r.render("a red circle, <lora:te:0>", [7])), base)


def test_unknown_lora_name_lists_close_names(loras, tiny_ckpt, capsys):
    _, dirs = loras
    code = main(["generate", "--base", str(tiny_ckpt), "--prompt", "<lora:subject:1>", "--lora-dir", str(dirs[1])])
    assert code == 2 and "Did you mean: subject_b" in capsys.readouterr().err


def test_sweep_sheet_has_one_column_per_strength(loras, tiny_ckpt):
    _, dirs = loras
    sheet, rendered = strength_sweep(Renderer(tiny_ckpt, dirs, FAST), ["a lab <lora:style_a>"], [1, 2], [0, 0.5, 1])
    cell = 128
    assert sheet.size == (230 + 3 * (cell + 4) + 4, 30 + 36 + 2 * (cell + 4) + 4)
    assert [r.params.prompt for r in rendered[::2]] == ["a lab <lora:style_a:0>", "a lab <lora:style_a:0.5>",
                                                         "a lab <lora:style_a:1>"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_ckpt):
    """Two small runs with validation, one with previews, plus a twin of the first (determinism)."""
    root = tmp_path_factory.mktemp("runs")
    write_dataset(root)
    common = dict(max_train_steps=4, batch_size=2, validation_split=0.25, validate_every_n_steps=2,
                  save_precision="fp32", learning_rate=1e-3)
    out = {}
    for name, extra in (("r8", dict(lora_rank=8)), ("r4", dict(lora_rank=4)), ("r8_twin", dict(lora_rank=8)),
                        ("r8_previews", dict(lora_rank=8, sample_every_n_steps=2, sample_steps=3,
                                             sample_prompts=["a lab", {"prompt": "a lab <lora:r8_previews:0.5>",
                                                                       "seed": 3}]))):
        cfg = load_config(seed_config(root, tiny_ckpt, output_dir=f"./output/{name}", **common, **extra))
        out[name] = train(cfg)
    return out


def test_validation_loss_is_logged_deterministic_and_summarised(runs):
    a, twin = runs["r8"], runs["r8_twin"]
    assert [s for s, _ in a.validation] == [2, 4]
    assert a.validation == twin.validation  # fixed noise and timesteps: identical runs, identical numbers
    assert a.num_images == 6  # 2 of 8 held out
    summary = json.loads((a.output_dir / "summary.json").read_text())
    assert summary["validation_loss"] == a.validation[-1][1] and summary["best_validation"]["step"] in (2, 4)
    assert (a.output_dir / "val_loss.csv").read_text().splitlines()[0] == "step,val_loss"


def test_previews_are_written_and_change_nothing(runs):
    plain, previews = runs["r8"], runs["r8_previews"]
    files = sorted(p.name for p in (previews.output_dir / "samples").glob("*.png"))
    assert files == ["step-000002-00.png", "step-000002-01.png", "step-000004-00.png", "step-000004-01.png"]
    info = parse_parameters(read_parameters(previews.output_dir / "samples" / "step-000004-01.png"))
    assert info["prompt"] == "a lab <lora:r8_previews:0.5>" and info["Seed"] == "3"
    a, b = load_file(str(plain.lora_path)), load_file(str(previews.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)  # drawing previews does not disturb training
    half = np.asarray(Image.open(previews.output_dir / "samples" / "step-000004-01.png"))
    assert half.shape == (32, 32, 3)


def test_a_sample_prompt_naming_another_lora_is_a_config_error(tmp_path, dataset, tiny_ckpt):
    cfg = load_config(seed_config(tmp_path, tiny_ckpt, sample_prompts=["x <lora:someone_else:1>"]))
    with pytest.raises(ConfigError, match="samples can only weight this run's LoRA"):
        train(cfg)
    assert not cfg.output_dir.exists()


def test_compare_writes_grid_loss_overlay_and_table(runs, tmp_path, capsys):
    dirs = [str(runs["r8"].output_dir), str(runs["r4"].output_dir)]
    assert main(["compare", *dirs, "--prompt", "a lab", "--n", "2", "--steps", "3", "--scheduler", "ddim",
                 "--out", str(tmp_path)]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert "| r8 | 8 |" in table and "| r4 | 4 |" in table and "val loss" in table
    with Image.open(tmp_path / "compare.png") as im:
        assert im.size[0] == 230 + 3 * 132 + 4  # base + two runs
    assert (tmp_path / "compare_loss.png").stat().st_size > 5000


def test_validation_dir_is_read_like_the_training_folder(tmp_path, dataset, tiny_ckpt):
    from conftest import make_images, write_metadata

    val = tmp_path / "val"
    names = make_images(val, 2, seed=5)
    write_metadata(val / "metadata.csv", [(n, "held out lab, consoles, neon lighting, digital art") for n in names])
    result = train(load_config(seed_config(tmp_path, tiny_ckpt, max_train_steps=2, batch_size=4,
                                           validation_dir=str(val), verify_after_training=False)))
    assert result.num_images == 8 and [s for s, _ in result.validation] == [2]  # all 8 train; 2 separate ones validate


# --- careless inputs (issue 16) -------------------------------------------------------------------------------
def test_generate_refuses_a_nan_lora_and_writes_nothing(tiny_ckpt, tmp_path, capsys):
    from helpers.bad_cases_interop import lora

    lora(tmp_path / "loras", "broken.safetensors", poison=float("nan"))
    out = tmp_path / "gen"
    code = main(["generate", "--base", str(tiny_ckpt), "--prompt", "a lab, <lora:broken:0.8>", "--lora-dir",
                 str(tmp_path / "loras"), "--steps", "2", "--out", str(out)])
    assert code == 2 and "1 of 6 weight tensors holds NaN" in capsys.readouterr().err
    assert not out.exists()  # not even the folder: no half-made output to clean up


def test_bad_settings_are_refused_for_every_caller(tiny_ckpt):
    """The web UI builds Settings and seeds itself: the same checks answer it (a 400, not a sampler crash)."""
    for bad in (dict(steps=0), dict(cfg=float("nan")), dict(size=(0, 64)), dict(size=(60, 64)),
                dict(scheduler="bogus")):
        with pytest.raises(LoraScriptsError):
            Settings(**bad)
    with pytest.raises(LoraScriptsError, match="seed"):
        Renderer(tiny_ckpt, [], FAST).render("a lab", [2**40])


def test_prompts_from_a_file(loras, tiny_ckpt, tmp_path):
    _, dirs = loras
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# tried on Monday\na lab, <lora:style_a:0.8>\n\nan arm\n", encoding="utf-8")
    args = ["generate", "--base", str(tiny_ckpt), "--prompt-file", str(prompts), "--steps", "2", "--scheduler",
            "ddim", "--out", str(tmp_path / "gen")] + [x for d in dirs for x in ("--lora-dir", str(d))]
    assert main(args) == 0
    written = sorted((tmp_path / "gen").glob("*.png"))
    assert [parse_parameters(read_parameters(p))["prompt"] for p in written] == ["a lab, <lora:style_a:0.8>", "an arm"]


def test_previews_decode_in_the_vaes_own_dtype_outside_autocast():
    """Under fp16 mixed precision the trainer keeps the VAE in fp32 (fp16 overflows to NaN on bright images, SDXL's
    always), but previews run the pipeline under autocast with fp16 latents: the decode must still run in fp32."""
    from lora_scripts.families import FAMILIES
    from lora_scripts.families.tiny import build_tiny
    from lora_scripts.training.previews import decode_in_own_dtype

    modules, _ = build_tiny(0, "sd15")
    vae = modules[FAMILIES["sd15"].autoencoder].float().eval()
    seen = []
    vae.decoder.conv_out.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    z = torch.randn(1, vae.config.latent_channels, 4, 4, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        vae.decode(z)  # what the pipeline did: the convolutions in bf16
        with decode_in_own_dtype(vae):
            out = vae.decode(z).sample
    assert seen == [torch.bfloat16, torch.float32] and out.dtype == torch.float32
    assert "decode" not in vae.__dict__  # the class's method again
