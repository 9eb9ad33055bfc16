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
from lora_scripts.memory import estimate_memory


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
    from lora_scripts.trainer import Trainer

    (dataset / "img_000.png").write_bytes((dataset / "img_001.png").read_bytes())  # an exact duplicate
    with caplog.at_level(logging.WARNING):
        Trainer(load_config(seed_config(tmp_path, tiny_ckpt))).check_data()
    assert "check: exact duplicates: img_000.png, img_001.png" in caplog.text


def test_memory_estimate_moves_the_right_way_for_sd15(tmp_path):
    def est(**kw):
        cfg = validate_config(dict(dict(train_data_dir=tmp_path, base_model=tmp_path, output_dir=tmp_path / "o",
                                        resolution=512, batch_size=1, mixed_precision="fp16"), **kw))
        return estimate_memory(cfg)

    base, gc, b4, fp32 = est(), est(gradient_checkpointing=True), est(batch_size=4), est(mixed_precision="no")
    # SD1.5's UNet + CLIP-L in fp16 and its VAE in fp32: 1.72 + 0.25 + 0.33 GB of weights
    assert 2.0 < base.weights / 2**30 < 2.3
    assert gc.activations < 0.25 * base.activations
    assert 3.5 < b4.activations / base.activations < 4.5
    assert fp32.weights > 1.8 * base.weights
    assert 3.0 < base.total_gb < 6.0, base.as_dict()  # published SD1.5 LoRA runs at 512 px: ~4-6 GB in nvidia-smi
