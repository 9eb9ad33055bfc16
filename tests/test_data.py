import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_images, seed_config, write_metadata
from lora_scripts.config import load_config
from lora_scripts.data.buckets import make_buckets, nearest_bucket
from lora_scripts.data.dataset import BucketBatchSampler, LoraDataset, build_items, process_caption
from lora_scripts.data.images import fit_to_bucket, open_rgb
from lora_scripts.data.scan import scan_dataset
from lora_scripts.errors import DatasetError


def _cfg(tmp_path, tiny_ckpt, **kw):
    return load_config(seed_config(tmp_path, tiny_ckpt, **kw))


def test_metadata_with_caption_column(tmp_path, dataset, tiny_ckpt):
    write_metadata(dataset / "metadata.csv", [(f"img_{i:03d}.png", f"cap {i}") for i in range(8)], text_col="caption")
    samples = scan_dataset(_cfg(tmp_path, tiny_ckpt))
    assert [s.caption for s in samples] == [f"cap {i}" for i in range(8)] and samples[0].size == (32, 32)


def test_sidecar_captions_and_kohya_repeats(tmp_path, tiny_ckpt):
    root = tmp_path / "data" / "sci_lab_train"
    for sub, n in (("10_lab", 2), ("1_misc", 1)):
        for name in make_images(root / sub, n, seed=n):
            (root / sub / name).with_suffix(".txt").write_text(f"{sub} caption")
    cfg = _cfg(tmp_path, tiny_ckpt, metadata_path=None)
    samples = scan_dataset(cfg)
    assert sorted(s.repeats for s in samples) == [1, 10, 10]
    assert len(build_items(samples, cfg)) == 21


def test_prescan_lists_every_problem_at_once(tmp_path, dataset, tiny_ckpt):
    (dataset / "img_000.png").write_bytes(b"not an image at all")
    data = (dataset / "img_001.png").read_bytes()
    (dataset / "img_001.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    rows = [(f"img_{i:03d}.png", "" if i == 2 else f"cap {i}") for i in range(8)] + [("missing.png", "x")]
    write_metadata(dataset / "metadata.csv", rows)
    with pytest.raises(DatasetError) as err:
        scan_dataset(_cfg(tmp_path, tiny_ckpt))
    text = str(err.value)
    assert "4 problem(s)" in text
    assert "img_000.png: unreadable image (not an image" in text
    assert "img_001.png: unreadable image" in text
    assert "img_002.png: empty or missing caption" in text
    assert "missing.png: file not found" in text
    assert "skip_bad_images" in text
    assert len(scan_dataset(_cfg(tmp_path, tiny_ckpt, skip_bad_images=True))) == 5


def test_exif_rotation_and_transparency(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    grey16.save(tmp_path / "g16.png")
    assert open_rgb(tmp_path / "g16.png").getpixel((0, 0)) == (255, 255, 255)


def test_buckets_keep_aspect_ratio():
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 for w, h in buckets)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    # 3:2 goes to the closest bucket (5:3), not to a square that would crop a third away
    assert nearest_bucket(1200, 800, buckets) == (640, 384)
    assert nearest_bucket(800, 1200, buckets) == (384, 640)
    assert nearest_bucket(700, 700, buckets) == (512, 512)
    im = fit_to_bucket(Image.new("RGB", (1200, 800)), (640, 384), None)
    assert im.size == (640, 384)


def test_batches_never_mix_buckets_and_are_reproducible(tmp_path, tiny_ckpt):
    root = tmp_path / "data" / "sci_lab_train"
    names = make_images(root, 6, size=(32, 32)) + [n.replace("img", "wide") for n in make_images(root / "w", 0)]
    for i in range(5):
        Image.new("RGB", (64, 32)).save(root / f"wide_{i}.png")
    rows = [(n, "a") for n in names] + [(f"wide_{i}.png", "b") for i in range(5)]
    write_metadata(root / "metadata.csv", rows)
    cfg = _cfg(tmp_path, tiny_ckpt, min_bucket_reso=32, max_bucket_reso=64, bucket_reso_steps=8)
    items = build_items(scan_dataset(cfg), cfg)
    sampler = BucketBatchSampler(items, 4, seed=1)
    batches = sampler.batches(0)
    assert all(len({items[i].bucket for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    assert batches == BucketBatchSampler(items, 4, seed=1).batches(0) != sampler.batches(1)
    ds = LoraDataset(items, cfg)
    a, b = ds[(batches[0][0], 0)], ds[(batches[0][0], 0)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["pixel_values"].min() >= -1


def test_caption_shuffle_keeps_tokens_and_dropout(tmp_path, dataset, tiny_ckpt):
    cfg = _cfg(tmp_path, tiny_ckpt, shuffle_caption=True, keep_tokens=1)
    outs = {process_caption("sks, a, b, c, d", cfg, random.Random(i)) for i in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks, ") for o in outs)
    drop = _cfg(tmp_path, tiny_ckpt, caption_dropout=1.0)
    assert process_caption("sks, a", drop, random.Random(0)) == ""


def test_caption_tag_dropout_keeps_the_first_tokens_and_drops_the_rest_at_its_rate(tmp_path, dataset, tiny_ckpt):
    cfg = _cfg(tmp_path, tiny_ckpt, caption_tag_dropout=0.3, keep_tokens=1)
    outs = [process_caption("sks, " + ", ".join(f"t{i}" for i in range(10)), cfg, random.Random(i)) for i in range(200)]
    assert all(o.startswith("sks") for o in outs)
    kept = sum(len(o.split(", ")) - 1 for o in outs) / (200 * 10)
    assert 0.62 < kept < 0.78, kept  # 0.7 expected
    assert all(o.split(", ")[1:] == sorted(o.split(", ")[1:], key=lambda t: int(t[1:])) for o in outs)  # order kept
    cached = _cfg(tmp_path, tiny_ckpt, caption_tag_dropout=0.3)
    from lora_scripts.data.cache import text_cache_plan

    assert text_cache_plan(cached) == (False, "captions change per step (shuffle_caption / caption_dropout / "
                                              "caption_tag_dropout)")
