"""`lora-scripts check` on a folder mixing good and deliberately bad files: every problem named by file."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.bad_inputs import _jpeg_bytes, _png16, _png_bytes, _rgba
from lora_scripts.cli import main
from lora_scripts.config import validate_config
from lora_scripts.training.memory import estimate_memory


@pytest.fixture
def mixed(tmp_path, tiny_ckpt) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)

    def caption(name, text):
        (d / name).with_suffix(".txt").write_text(text, encoding="utf-8")

    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(d / f"good_{i}.png")
        caption(f"good_{i}.png", f"sci_lab, glowing console number {i}, blue neon lighting, digital painting")
    (d / "cut.png").write_bytes(_png_bytes(256)[:300])
    caption("cut.png", "sci_lab, a cut image, dim light, photo")
    (d / "cmyk.jpg").write_bytes(_jpeg_bytes("CMYK"))
    caption("cmyk.jpg", "sci_lab, red wall, flat light, print")
    _png16(d / "deep.png")
    caption("deep.png", "sci_lab, grey ramp, soft light, scan")
    _rgba(d / "alpha.png")
    caption("alpha.png", "sci_lab, blue cutout, studio light, render")
    (d / "notes.jpg").write_bytes(b"shopping list")
    caption("notes.jpg", "sci_lab, notes, none, text")
    Image.new("RGB", (20, 20)).save(d / "tiny.png")
    caption("tiny.png", "sci_lab, a tiny dark icon, dark, pixel art")
    (d / "copy.png").write_bytes((d / "good_0.png").read_bytes())
    caption("copy.png", "sci_lab, a copy of zero, neon, painting")
    Image.open(d / "good_1.png").resize((90, 90)).save(d / "near.png")
    caption("near.png", "a lab")
    Image.new("RGB", (96, 96), "white").save(d / "nocap.png")
    (d / "twin.png").write_bytes(_png_bytes(96))
    caption("twin.png", "sci_lab, glowing console number 2, blue neon lighting, digital painting")
    (d / "old.caption").write_text("sci_lab, stale caption file")
    config = tmp_path / "c.yaml"
    config.write_text(f"train_data_dir: ./data\nbase_model: {tiny_ckpt}\noutput_dir: ./out\nresolution: 64\n"
                      "batch_size: 2\nepochs: 30\nlearning_rate: 1e-3\n")
    return config


def test_every_problem_is_reported_by_file_name(mixed, capsys):
    assert main(["check", "--config", str(mixed), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    by_level = {lvl: [f["message"] for f in report["findings"] if f["level"] == lvl] for lvl in ("error", "warning", "advice")}
    errors, warnings, advice = (" | ".join(by_level[k]) for k in ("error", "warning", "advice"))
    assert "cut.png: unreadable image (file is truncated" in errors
    assert "notes.jpg: unreadable image (not an image" in errors
    assert "nocap.png: empty or missing caption" in errors
    assert not any(name in errors for name in ("cmyk.jpg", "deep.png", "alpha.png"))  # unusual but valid
    assert "tiny.png: 20x20 is smaller than resolution 64 (short side 69% below)" in warnings
    assert "exact duplicates: copy.png, good_0.png" in warnings
    assert "near duplicates: good_1.png and near.png" in warnings
    assert "near.png: caption 'a lab' is too short or generic" in warnings
    assert "2 images share the caption" in warnings and "twin.png" in warnings
    assert "lack the trigger word 'sci_lab': near.png" in warnings
    assert ".caption files found but caption_extension is .txt" in warnings
    assert "epochs 30" in advice and "learning_rate 0.001" in advice and "images is few" in advice
    assert report["stats"]["images"] == 13 and report["stats"]["steps_per_epoch"] == 7  # 13 usable, batch 2
    assert report["stats"]["total_steps"] == 210
    assert report["stats"]["memory"]["total_gb"] > 0


def test_text_report_and_a_clean_folder_passes(tmp_path, dataset, tiny_ckpt, capsys):
    from conftest import seed_config

    config = seed_config(tmp_path, tiny_ckpt, epochs=12)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "8 usable images" in out and "no errors: ready to train" in out and "memory: estimated peak" in out


def test_train_prints_the_check_warnings_first(tmp_path, dataset, tiny_ckpt, caplog):
    from conftest import seed_config
    from lora_scripts.config import load_config
    from lora_scripts.training.trainer import Trainer

    (dataset / "img_000.png").write_bytes((dataset / "img_001.png").read_bytes())  # an exact duplicate
    with caplog.at_level(logging.WARNING):
        Trainer(load_config(seed_config(tmp_path, tiny_ckpt))).check_data()
    assert "check: exact duplicates: img_000.png, img_001.png" in caplog.text


def test_memory_estimate_moves_the_right_way_for_sd15(tmp_path):
    (tmp_path / "data").mkdir()

    def est(**kw):
        cfg = validate_config(dict(dict(train_data_dir=tmp_path / "data", base_model=tmp_path, output_dir=tmp_path / "o",
                                        resolution=512, batch_size=1, mixed_precision="fp16"), **kw))
        return estimate_memory(cfg)

    base, gc, b4, fp32 = est(), est(gradient_checkpointing=True), est(batch_size=4), est(mixed_precision="no")
    previews = est(sample_prompts=["a lab"])
    # With previews, SD1.5's UNet + CLIP-L in fp16 and its VAE in fp32 stay on the GPU: 1.72 + 0.25 + 0.33 GB of
    # weights; without, the cached VAE and text encoder leave it (the UNet's 1.6 GiB only).
    assert 2.0 < previews.weights / 2**30 < 2.3
    assert 1.55 < base.weights / 2**30 < 1.65 and base.caching > 0 and est(cache_latents=False).caching == 0
    # With it: the blocks' inputs, the layers outside them, and the block the backward pass recomputes.
    assert gc.activations < 0.3 * base.activations
    # A trained text encoder is checkpointed too (as the trainer does): its share of the activations shrinks.
    te, te_gc = est(train_text_encoder=True), est(train_text_encoder=True, gradient_checkpointing=True)
    assert 0 < te_gc.activations - gc.activations < 0.5 * (te.activations - base.activations)
    assert 3.5 < b4.activations / base.activations < 4.5
    assert fp32.weights > 1.8 * base.weights
    # Published SD1.5 LoRA runs at 512 px take ~4-6 GB in nvidia-smi (CUDA context and allocator cache included)
    # with the VAE and text encoder on the GPU, as they stay here with previews.
    assert 3.0 < previews.total_gb < 6.0, previews.as_dict()


def test_checkpointing_counts_the_region_the_backward_pass_recomputes():
    """Under gradient checkpointing a region keeps its input until the backward pass, which then runs it again and
    holds what it saves, while what the forward pass saved after that region is already freed: the estimate's
    count is the largest of (kept when a region began + what it saves), counted by hand."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lora_scripts.training.memory import count_saved

    class Block(nn.Module):  # saves its input (first Linear), the GELU's input and output (second Linear)
        def __init__(self, hidden):
            super().__init__()
            self.up, self.down = nn.Linear(8, hidden), nn.Linear(hidden, 8)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self._gradient_checkpointing_func = nn.ModuleList([Block(32), Block(16)]), None

        def forward(self, x):
            for block in self.blocks:
                x = self._gradient_checkpointing_func(block, x) if self._gradient_checkpointing_func else block(x)
            return x.square().sum()  # saves the last output

    b, net, x = 3, Net(), torch.randn(3, 8)
    plain = count_saved(lambda: net(x))
    assert plain.total == 4 * b * (8 + 32 + 32 + 8 + 16 + 16 + 8) and plain.largest == 4 * b * 32
    net._gradient_checkpointing_func = lambda fn, *args: fn(*args)  # as diffusers/transformers call it
    checkpointed = count_saved(lambda: net(x), [net])
    # kept: x, the first block's output and the last output (8 each); the first block, recomputed with only x
    # kept before it, holds its GELU's input and output (32 each): 8 + 64 > (8 + 8) + 2 * 16 > 24 kept in all.
    assert (checkpointed.total, checkpointed.largest) == (4 * b * (8 + 32 + 32), 4 * b * 32)
    assert (checkpointed.kept, checkpointed.recompute) == (4 * b * (8 + 8 + 8), 4 * b * (32 + 32))
    # FLOPs: the four matmuls (2 x rows x in x out each); every block runs again in the backward pass.
    matmuls = 2 * b * (8 * 32 + 32 * 8 + 8 * 16 + 16 * 8)
    assert plain.flops == checkpointed.flops == checkpointed.recompute_flops == matmuls and plain.recompute_flops == 0
    frozen = nn.Linear(8, 8)  # a frozen encoder run beside the trained ones: its forward FLOPs are left out
    assert count_saved(lambda: net(frozen(x)), frozen=[frozen]).flops == matmuls
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 3)  # attention: q @ k^T, then @ v
    assert count_saved(lambda: F.scaled_dot_product_attention(q, k, v)).flops == 2 * (2 * 5 * 7) * (4 + 3)


def test_checkpointed_inputs_in_tuples_and_nested_regions_are_counted_once():
    """A region's tensors passed inside a tuple (Flux's rotary embedding) are kept for its recomputation; a region
    called inside another (transformers' partial(...) form) is part of the outer one; checkpoint's own options
    are not handed to the block."""
    from functools import partial

    import torch

    from lora_scripts.training.memory import count_saved

    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(3, 8)
    state = {}

    def inner(h):
        return (h @ w).exp()  # saves h (for w's gradient) and the exp's output, 96 B each

    def outer(h, extra):
        return state["func"](partial(inner), h * extra[0], use_reentrant=False)  # the product saves nothing

    def run():
        return state["func"](outer, x, (torch.ones(3, 8),), use_reentrant=False).sum()

    saved = count_saved(lambda: None)  # a counter to install by hand
    state["func"] = saved.checkpoint
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        run()
    # kept: x and the tuple's tensor (96 B each); the one region (the inner call is part of it, its input not kept
    # apart): the product and the exp's output.
    assert (saved.kept, saved.recompute) == (2 * 96, 2 * 96)


def test_what_each_memory_setting_costs_a_step_is_counted(tmp_path):
    """check --vram's cost of each proposed setting, from the estimate's counts: checkpointing's recomputed FLOPs
    against the step's (backward = 1.15 x forward), the stored bytes cast per pass, a swap's copies (the largest
    blocks, twice a step) at PCIe 4.0 x16's rate."""
    from lora_scripts.training.memory import GB, MemoryEstimate
    from lora_scripts.training.step_costs import step_costs

    (tmp_path / "data").mkdir()
    estimate = MemoryEstimate(0, 0, 0, 0, 0, "", blocks=(3 * GB, 1 * GB, 2 * GB), stored=4 * GB, forward_flops=1e12,
                              recompute_flops=0.86e12)
    changes = {"gradient_checkpointing": True, "base_weight_dtype": "fp8", "offload": "blocks:2"}
    cfg = validate_config(dict(train_data_dir=tmp_path / "data", base_model=tmp_path, output_dir=tmp_path / "o",
                               mixed_precision="bf16", **changes))
    gc, stored, swap = step_costs(cfg, changes, estimate)
    assert gc == "gradient_checkpointing: +40 % compute (0.9 TFLOP run again, on 2.1 TFLOP a step)"
    assert stored.startswith("base_weight_dtype: fp8: 4.0 GB of stored weights cast to the compute dtype 2x a step")
    assert swap.startswith("offload: blocks:2: 10.0 GB copied host-to-GPU a step (about 0.4 s at PCIe 4.0 x16")
    nf4 = step_costs(cfg.model_copy(update={"base_weight_dtype": "nf4"}), {"base_weight_dtype": "nf4"}, estimate)
    assert "cast to the compute dtype 3x a step" in nf4[0]  # bitsandbytes dequantises again in the backward pass


def test_check_vram_proposes_the_settings_that_fit(tmp_path):
    """`check --vram`: the memory ladder's first settings whose estimate fits (SD1.5's real configs, 512 px,
    batch 4, fp32), each change kept as the next is added; and what is missing when nothing on it is enough."""
    from lora_scripts.data.check import check_dataset
    from lora_scripts.training.memory import LADDER, fitting_settings

    from conftest import make_images, write_metadata

    dataset = tmp_path / "data"
    names = make_images(dataset, 4, size=(512, 512))
    write_metadata(dataset / "metadata.csv", [(n, f"sci lab {i}, glowing consoles, neon lighting") for i, n in enumerate(names)])
    cfg = validate_config(dict(train_data_dir=dataset, metadata_path=dataset / "metadata.csv", base_model=tmp_path,
                               output_dir=tmp_path / "o", resolution=512, batch_size=4))
    full = estimate_memory(cfg).total_gb
    changes, fitted, fits = fitting_settings(cfg, 3.0)
    assert fits and fitted.total_gb <= 3.0 < full
    assert list(changes) == list(dict.fromkeys(k for k, _ in LADDER if k in changes))  # in the ladder's order
    assert changes["mixed_precision"] == "bf16" and changes["gradient_checkpointing"] is True
    assert estimate_memory(cfg.model_copy(update=changes)).total_gb == fitted.total_gb
    (warning,) = [f.message for f in check_dataset(cfg, vram_gb=3.0).findings if f.topic == "memory"]
    assert f"estimated peak {full:.1f} GB exceeds the 3 GB available; with mixed_precision: bf16, " \
           "gradient_checkpointing: true" in warning and "add these to the config" in warning
    # ...and what each costs a step: checkpointing's recomputation from SD1.5's counted FLOPs (about 0.8 TFLOP
    # forward per image at 512 px).
    import re

    recompute, step = (float(x) for x in re.search(r"\(([\d.]+) TFLOP run again, on ([\d.]+) TFLOP a step\)",
                                                   warning).groups())
    assert 4 * 1.4 < step < 4 * 2.2 and 0.3 < recompute / step < 0.5, warning
    (warning,) = [f.message for f in check_dataset(cfg, vram_gb=0.5).findings if f.topic == "memory"]
    assert "even with" in warning and "lower resolution as well" in warning
    # What a GPU run logs before loading anything (Trainer.check_fits with the device's free memory).
    from lora_scripts.training.memory import too_big

    assert too_big(cfg, 64 * 2**30) is None
    assert "exceeds the 3 GB available; with mixed_precision: bf16" in too_big(cfg, 3 * 2**30)
    # A device a byte short of the estimate: advice, not a budget rounded up to where nothing needs to change.
    assert "; with mixed_precision: bf16" in too_big(cfg, estimate_memory(cfg).total - 1)


def test_a_multi_gpu_run_checks_the_estimate_against_its_smallest_gpu():
    """Trainer.check_fits gathers every process's free memory: each GPU must hold the step, the main process
    warns for the smallest."""
    import torch

    from lora_scripts.training.trainer import smallest_across

    class Acc:
        num_processes, device = 2, torch.device("cpu")

        def gather(self, t):
            return torch.cat([t, torch.tensor([3 * 2**30])])

    assert smallest_across(Acc(), 20 * 2**30) == 3 * 2**30
    Acc.num_processes = 1
    assert smallest_across(Acc(), 20 * 2**30) == 20 * 2**30


def test_the_recipe_stores_text_encoders_smaller_only_where_that_lowers_the_peak(tmp_path):
    """With the caches the text encoders leave the GPU before the steps: text_encoder_weight_dtype is dropped from a
    fitting recipe when the estimate fits without it, kept when previews keep the encoders resident (SD1.5)."""
    from lora_scripts.training.memory import _needed

    (tmp_path / "data").mkdir()
    changes = {"mixed_precision": "bf16", "gradient_checkpointing": True, "text_encoder_weight_dtype": "fp8"}
    cached = validate_config(dict(train_data_dir=tmp_path / "data", base_model=tmp_path, output_dir=tmp_path / "o",
                                  resolution=512))
    fitted = estimate_memory(cached.model_copy(update=changes))
    kept, estimate, fits = _needed(cached, changes, fitted, fitted.total_gb, None)
    assert fits and "text_encoder_weight_dtype" not in kept and estimate.total_gb <= fitted.total_gb
    previews = cached.model_copy(update={"sample_prompts": ["a lab"]})
    small, large = (estimate_memory(previews.model_copy(update=c)).total_gb
                    for c in (changes, {k: v for k, v in changes.items() if k != "text_encoder_weight_dtype"}))
    assert small < large
    assert _needed(previews, changes, fitted, (small + large) / 2, None)[0] == changes


def test_the_ladder_skips_settings_the_config_refuses_together(tmp_path):
    """The ladder's trial configs are copies (model_copy runs no validator): each is checked against the config's
    own rules, so DoRA, which reads its frozen weight every step, is never offered int8/nf4."""
    from lora_scripts.training.memory import _invalid

    (tmp_path / "data").mkdir()
    dora = validate_config(dict(train_data_dir=tmp_path / "data", base_model=tmp_path, output_dir=tmp_path / "o",
                                network_type="dora"))
    assert not _invalid(dora) and not _invalid(dora.model_copy(update={"base_weight_dtype": "fp8"}))
    assert _invalid(dora.model_copy(update={"base_weight_dtype": "int8"}))


def test_check_vram_8_gives_flux_dev_the_block_swap_recipe(tmp_path):
    """Flux.1-dev's real configs (meta device) at 1024 px: 8 GB is reached with fp8 weights and most of its 57
    blocks swapped; the int8 step before it is replaced by fp8, which a swap can move."""
    from lora_scripts.families import FAMILIES, FAMILY_KEY
    from lora_scripts.training.memory import fitting_settings

    (tmp_path / "data").mkdir()
    cfg = validate_config(dict(train_data_dir=tmp_path / "data", base_model=tmp_path, output_dir=tmp_path / "o",
                               resolution=1024, batch_size=1))
    configs = {**FAMILIES["flux1"].embedded_configs(), FAMILY_KEY: "flux1"}
    changes, fitted, fits = fitting_settings(cfg, 8.0, configs)
    assert fits and fitted.total_gb <= 8.0 and len(fitted.blocks) == 57
    count = int(changes.pop("offload").removeprefix("blocks:"))
    assert 29 <= count <= 52, count  # most of them (41 estimated, each block recomputed with its bf16 copies)
    assert changes == {"mixed_precision": "bf16", "gradient_checkpointing": True, "text_encoder_weight_dtype": "fp8",
                       "base_weight_dtype": "fp8"}
    # A GPU run's warning before loading: none with offload: auto, which sizes the swap to the free memory.
    from lora_scripts.training.memory import too_big

    auto = cfg.model_copy(update={**changes, "offload": "auto"})
    assert too_big(auto, 8 * 2**30, configs) is None


LONG = "sci_lab, " + ", ".join(f"glowing console number {i} with blue light" for i in range(14)) + ", trigger_at_end"


def _sidecars(folder, captions):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(captions):
        Image.new("RGB", (64, 64), (20 * i, 40, 90)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(text, encoding="utf-8")


def _config(tmp_path, tiny_ckpt, data="./data"):
    config = tmp_path / "c.yaml"
    config.write_text(f"train_data_dir: {data}\nbase_model: {tiny_ckpt}\noutput_dir: ./out\nresolution: 64\n"
                      "batch_size: 1\nepochs: 12\n")
    return config


def test_captions_over_the_token_limit_are_counted_and_named(tmp_path, tiny_ckpt, capsys, caplog):
    from lora_scripts.families.clip_tokenizer import clip_tokenizer

    _sidecars(tmp_path / "data", [LONG, LONG + ", more words", "sci_lab, a short caption, blue light, photo"])
    tokens = len(clip_tokenizer()(LONG, add_special_tokens=False).input_ids)
    assert tokens > 75
    assert main(["check", "--config", str(_config(tmp_path, tiny_ckpt)), "--json"]) == 0
    warnings = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["level"] == "warning"]
    long = [f for f in warnings if "tokens the text encoder reads" in f["message"]]
    assert len(long) == 1, warnings
    lost = (tokens - 75) + (tokens + 3 - 75)  # ", more words" is 3 more tokens
    assert long[0]["message"].startswith(f"2 captions are longer than the 75 tokens the text encoder reads; training "
                                         f"cuts off their ends ({lost} tokens lost in all): img_0.txt ({tokens} tokens), "
                                         f"img_1.txt ({tokens + 3} tokens)"), long[0]["message"]
    assert [Path(f).name for f in long[0]["files"]] == ["img_0.txt", "img_1.txt"]
    from lora_scripts.config import load_config
    from lora_scripts.training.trainer import Trainer

    with caplog.at_level(logging.WARNING):
        Trainer(load_config(_config(tmp_path, tiny_ckpt))).check_data()
    assert "check: 2 captions are longer than the 75 tokens the text encoder reads" in caplog.text


def test_check_counts_a_linked_repeat_folder_and_warns_about_zero_repeats(tmp_path, tiny_ckpt, capsys):
    _sidecars(tmp_path / "elsewhere" / "subject", [f"sci_lab, console {i}, blue neon light, painting" for i in range(3)])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "10_subject").symlink_to(tmp_path / "elsewhere" / "subject", target_is_directory=True)
    _sidecars(tmp_path / "data" / "0_unused", ["sci_lab, an unused picture, dim light, photo"])
    assert main(["check", "--config", str(_config(tmp_path, tiny_ckpt))]) == 0
    out = capsys.readouterr().out
    assert "dataset: 3 usable images" in out and "10_subject: 3 images" in out
    assert "30 steps per epoch" in out
    assert "0_unused: repeat count 0, so its 1 image is not trained" in out


def test_check_names_broken_links_and_refuses(tmp_path, tiny_ckpt, capsys):
    _sidecars(tmp_path / "data", ["sci_lab, console, blue neon light, painting"])
    (tmp_path / "data" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert main(["check", "--config", str(_config(tmp_path, tiny_ckpt))]) == 1
    out = capsys.readouterr().out
    assert "[images] " + str(tmp_path / "data" / "gone.png") + ": broken link" in out
    assert "fix the errors above before training" in out


def test_check_with_no_images_says_which_formats_are_read(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "photo.heic.txt").write_text("sci_lab")
    assert main(["check", "--config", str(_config(tmp_path, tiny_ckpt))]) == 1
    out = capsys.readouterr().out
    assert "no usable images in" in out and ".png, .jpg, .jpeg, .jfif, .webp" in out


def test_caption_files_without_an_image_are_named(tmp_path, tiny_ckpt, capsys):
    _sidecars(tmp_path / "data", [f"sci_lab, console {i}, blue neon light, painting" for i in range(2)])
    (tmp_path / "data" / "photo.txt").write_text("sci_lab, the image of this caption was deleted")
    assert main(["check", "--config", str(_config(tmp_path, tiny_ckpt))]) == 0
    assert ("1 caption files have no image beside them, so nothing is trained from them: photo.txt"
            in capsys.readouterr().out)
