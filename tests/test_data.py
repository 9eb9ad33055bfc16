import logging
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


@pytest.mark.parametrize("processes", [2, 3, 4, 8])
def test_under_several_processes_each_gets_whole_one_bucket_batches_and_as_many_as_the_others(processes):
    """accelerate shards the batch sampler across processes (prepare's BatchSamplerShard). A bucket's
    last batch is smaller; it must still reach one process whole: no batch mixing buckets (Collate would fail on
    that process alone), no image left out of an epoch, and the same number of batches everywhere (a process
    with one more would wait in a gradient all-reduce the others never join)."""
    from types import SimpleNamespace

    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    rng = random.Random(processes)
    for trial in range(60):
        items = [SimpleNamespace(bucket=(32 * rng.randint(1, 3), 32)) for _ in range(rng.randint(processes, 40))]
        sampler = BucketBatchSampler(items, rng.choice([1, 2, 3, 4]), seed=trial)
        sampler.set_epoch(trial % 3)
        loader = DataLoader(range(len(items)), batch_sampler=sampler, collate_fn=list)
        shards = [prepare_data_loader(loader, num_processes=processes, process_index=r,
                                      put_on_device=False).batch_sampler for r in range(processes)]
        got = [list(shard) for shard in shards]
        assert {len(g) for g in got} == {len(shards[0])}, (trial, [len(g) for g in got], len(shards[0]))
        assert all(len({items[i].bucket for i, _ in batch}) == 1 for g in got for batch in g), trial
        assert {i for g in got for batch in g for i, _ in batch} == set(range(len(items))), trial


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


# --- links, formats, modes, caption files, repeat folders, careless metadata.csv (issue 16) -----------------------
def _picture(path, colour=(200, 30, 30), size=(64, 64), caption="a red square, plain room, flat light, photo", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _sidecar_cfg(data, **kw):
    from lora_scripts.config import validate_config

    return validate_config({"train_data_dir": data, "base_model": data, "output_dir": data.parent / "out",
                            "resolution": 64, **kw})


def test_symlinked_repeat_folder_and_images_are_trained_and_bad_links_named(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _picture(elsewhere / "subject" / "a.png")
    _picture(elsewhere / "subject" / "b.png", (0, 0, 200))
    _picture(elsewhere / "single.png", caption=None)
    data.mkdir()
    (data / "10_subject").symlink_to(elsewhere / "subject", target_is_directory=True)
    (data / "linked.png").symlink_to(elsewhere / "single.png")
    (data / "linked.txt").write_text("a linked image, plain room, flat light, photo")
    (data / "dangling.png").symlink_to(data / "deleted.png")
    (data / "loop_a.png").symlink_to(data / "loop_b.png")
    (data / "loop_b.png").symlink_to(data / "loop_a.png")
    (elsewhere / "subject" / "up").symlink_to(data, target_is_directory=True)  # a folder link back up: a loop
    with pytest.raises(DatasetError) as err:
        scan_dataset(_sidecar_cfg(data))
    text = str(err.value)
    assert "4 problem(s)" in text
    assert f"{data / 'dangling.png'}: broken link (points to {data / 'deleted.png'}, which does not exist)" in text
    assert f"{data / 'loop_a.png'}: link loop" in text and f"{data / 'loop_b.png'}: link loop" in text
    assert f"{data / '10_subject' / 'up'}: link loop (it leads back to {data.resolve()}" in text
    samples = scan_dataset(_sidecar_cfg(data, skip_bad_images=True))
    assert [(s.path.relative_to(data).as_posix(), s.repeats) for s in samples] == [
        ("10_subject/a.png", 10), ("10_subject/b.png", 10), ("linked.png", 1)]


def test_every_format_pillow_opens_is_found_not_a_short_list(tmp_path):
    data = tmp_path / "data"
    for name, fmt in (("a.jfif", "JPEG"), ("b.jpe", "JPEG"), ("c.JFIF", "JPEG"), ("d.tga", "TGA"), ("e.png", "PNG"),
                      ("f.ppm", "PPM"), ("g.qoi", "QOI")):
        _picture(data / name, format=fmt)
    assert sorted(s.path.name for s in scan_dataset(_sidecar_cfg(data))) == [
        "a.jfif", "b.jpe", "c.JFIF", "d.tga", "e.png", "f.ppm", "g.qoi"]


def test_image_modes_are_converted_as_a_viewer_shows_them():
    from lora_scripts.data.images import to_rgb

    def row(im):
        return np.asarray(to_rgb(im), dtype=np.int16)[0].tolist()

    def grey(values, dtype):
        return Image.fromarray(np.array([values], dtype))

    assert row(grey([0.0, 0.5, 1.0], np.float32)) == [[0] * 3, [128] * 3, [255] * 3]  # float 0..1: x255, not black
    assert row(grey([0.0, 128.0, 255.0], np.float32)) == [[0] * 3, [128] * 3, [255] * 3]
    assert row(grey([-1.0, 0.0, 1.0], np.float32)) == [[0] * 3, [128] * 3, [255] * 3]  # other ranges: stretched
    assert row(grey([0.0, 500.0, 1000.0], np.float32)) == [[0] * 3, [128] * 3, [255] * 3]
    assert row(grey([0, 32768, 65535], np.int32)) == [[0] * 3, [128] * 3, [255] * 3]  # 16-bit data in mode I
    assert row(grey([0, 100000, 200000], np.int32)) == [[0] * 3, [128] * 3, [255] * 3]
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")):
        im = Image.frombytes(mode, (3, 1), np.array([0, 32768, 65535], dtype).tobytes())
        assert row(im) == [[0] * 3, [128] * 3, [255] * 3], mode
    for mode in ("LA", "La", "PA"):  # fully transparent: white, as on a viewer's white page
        assert row(Image.new(mode, (2, 1), 0)) == [[255] * 3] * 2, mode
    assert row(Image.new("LA", (1, 1), (0, 255))) == [[0, 0, 0]]
    assert row(Image.new("1", (1, 1), 1)) == [[255, 255, 255]]
    assert row(Image.new("YCbCr", (1, 1), (76, 85, 255))) == [[254, 0, 0]]
    assert row(Image.new("HSV", (1, 1), (170, 255, 255))) == [[0, 0, 255]]
    assert row(Image.new("LAB", (1, 1), (136, 208, 195))) == [[250, 3, 11]]
    keyed = Image.new("RGB", (1, 1), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)  # a PNG tRNS colour key
    assert row(keyed) == [[255, 255, 255]]


def test_float_tiff_trains_as_its_picture_not_black(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    Image.fromarray(ramp).save(data / "scan.tif")
    (data / "scan.txt").write_text("a grey ramp, plain room, flat light, scan")
    samples = scan_dataset(_sidecar_cfg(data))
    pixels = np.asarray(open_rgb(samples[0].path))[0, :, 0]
    assert pixels[0] == 0 and pixels[-1] == 255 and (np.diff(pixels.astype(int)) >= 0).all()


def test_upper_case_caption_extension_is_found(tmp_path):
    data = tmp_path / "data"
    _picture(data / "a.png", caption=None)
    (data / "a.TXT").write_text("an upper-case caption file, room, light, photo")
    _picture(data / "b.png", caption=None)
    (data / "b.txt").write_text("the exact name wins, room, light, photo")
    (data / "b.Txt").write_text("not this one")
    assert [s.caption for s in scan_dataset(_sidecar_cfg(data))] == [
        "an upper-case caption file, room, light, photo", "the exact name wins, room, light, photo"]


def test_repeat_folder_prefixes(tmp_path, caplog):
    data = tmp_path / "data"
    _picture(data / "0_off" / "a.png")
    _picture(data / "-2_neg" / "b.png")
    _picture(data / "abc_name" / "c.png")
    _picture(data / "3_on" / "d.png")
    with caplog.at_level(logging.WARNING):
        samples = scan_dataset(_sidecar_cfg(data))
    assert sorted((s.path.parent.name, s.repeats) for s in samples) == [("3_on", 3), ("abc_name", 1)]
    assert ("0_off: repeat count 0, so its 1 image is not trained (kohya's sd-scripts skips such folders too); "
            "rename it to 1_off or more to train them") in caplog.text
    assert "-2_neg: repeat count -2, so its 1 image is not trained" in caplog.text
    _picture(data / "99999999_huge" / "e.png")
    _picture(data / "2.5_half" / "f.png")
    with pytest.raises(DatasetError) as err:
        scan_dataset(_sidecar_cfg(data))
    assert "99999999_huge: repeat count 99999999 is too large (at most 10000" in str(err.value)
    assert "2.5_half: repeat count 2.5 is not a whole number; rename the folder to 2_half" in str(err.value)


def test_only_zero_repeat_folders_is_refused_with_the_reason(tmp_path):
    data = tmp_path / "data"
    _picture(data / "0_off" / "a.png")
    with pytest.raises(DatasetError) as err:
        scan_dataset(_sidecar_cfg(data))
    assert "no usable images found" in str(err.value) and "0_off: repeat count 0" in str(err.value)


def test_careless_metadata_rows_are_named(tmp_path):
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "sub/c.png"):
        _picture(data / name, caption=None)
    _picture(tmp_path / "outside.png", caption=None)
    (data / "folder.png").mkdir()
    (data / "empty.png").write_bytes(b"")
    rows = [("a.png", "first row, room, light, photo"), ("", "no file name"), ("a.png", "a duplicate row"),
            (str(tmp_path / "outside.png"), "absolute, outside"), ("../outside.png", "relative, outside"),
            ("folder.png", "a folder"), ("empty.png", "zero bytes"), ("sub\\c.png", "windows path, room, light, photo"),
            (str(data / "b.png"), "absolute inside, room, light, photo")]
    write_metadata(data / "metadata.csv", rows)
    cfg = _sidecar_cfg(data, metadata_path=data / "metadata.csv")
    with pytest.raises(DatasetError) as err:
        scan_dataset(cfg)
    text = str(err.value)
    assert "6 problem(s)" in text, text
    assert "metadata.csv line 3: empty file_name" in text
    assert "metadata.csv line 4: a.png is listed again (first on line 2)" in text
    assert f"metadata.csv line 5: file_name '{tmp_path / 'outside.png'}' points outside train_data_dir" in text
    assert "metadata.csv line 6: file_name '../outside.png' points outside train_data_dir" in text
    assert f"{data / 'folder.png'}: is a folder, not an image file" in text
    assert f"{data / 'empty.png'}: empty file (0 bytes)" in text
    samples = scan_dataset(_sidecar_cfg(data, metadata_path=data / "metadata.csv", skip_bad_images=True))
    assert [(s.path.name, s.caption) for s in samples] == [
        ("a.png", "first row, room, light, photo"), ("c.png", "windows path, room, light, photo"),
        ("b.png", "absolute inside, room, light, photo")]


def test_caption_file_that_is_a_folder_or_a_broken_link_is_named(tmp_path):
    data = tmp_path / "data"
    _picture(data / "a.png", caption=None)
    (data / "a.txt").mkdir()
    _picture(data / "b.png", caption=None)
    (data / "b.txt").symlink_to(data / "gone.txt")
    _picture(data / "c.png")
    with pytest.raises(DatasetError) as err:
        scan_dataset(_sidecar_cfg(data))
    assert f"{data / 'a.txt'}: is a folder, not a caption file" in str(err.value)
    assert f"{data / 'b.txt'}: broken link (points to {data / 'gone.txt'}" in str(err.value)


def test_exif_rotation_gives_the_trained_size_and_pixels(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    im = Image.new("RGB", (96, 64), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 96, 32))  # blue top half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the blue half is on the right
    im.save(data / "rot.jpg", exif=exif, quality=95)
    (data / "rot.txt").write_text("a rotated photo, room, light, photo")
    im.save(data / "badexif.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01", quality=95)
    (data / "badexif.txt").write_text("a photo with damaged exif, room, light, photo")
    samples = {s.path.name: s for s in scan_dataset(_sidecar_cfg(data))}
    assert samples["rot.jpg"].size == (64, 96) and samples["badexif.jpg"].size == (96, 64)
    pixels = np.asarray(open_rgb(samples["rot.jpg"].path), dtype=int)
    assert pixels[48, 56, 2] > 200 and pixels[48, 8, 0] > 200  # blue right, red left


def test_pictures_pillow_cannot_read_are_named_not_dropped(tmp_path):
    data = tmp_path / "data"
    _picture(data / "a.png")
    (data / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (data / "phone.txt").write_text("an iphone photo, room, light, photo")
    (data / "notes.md").write_text("not a picture: ignored")
    with pytest.raises(DatasetError) as err:
        scan_dataset(_sidecar_cfg(data))
    assert "1 problem(s)" in str(err.value)
    assert f"{data / 'phone.heic'}: cannot be read (HEIC (iPhone) images need the pillow-heif plugin); save it as " \
           "PNG or JPEG" in str(err.value)
    assert [s.path.name for s in scan_dataset(_sidecar_cfg(data, skip_bad_images=True))] == ["a.png"]


def test_a_broken_colour_profile_falls_back_to_plain_colours(tmp_path):
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "icc.png", icc_profile=b"not a colour profile")
    assert open_rgb(tmp_path / "icc.png").getpixel((0, 0)) == (200, 30, 30)
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "srgb.png", icc_profile=srgb)
    assert np.abs(np.subtract(open_rgb(tmp_path / "srgb.png").getpixel((0, 0)), (200, 30, 30))).max() <= 2
