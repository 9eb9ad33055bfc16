"""Bad-input cases for datasets and labelling: links, formats, caption files, repeat folders (rows of docs/bad_inputs.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from helpers.bad_inputs import (SIZE, Accepted, Command, Refused, _captions_are, _config, _csv, _images, _near, _pixels,
                                _sidecar_tree, _tree)

CAPTION = "a test image, plain room, flat light, photo"


# --- building blocks ------------------------------------------------------------------------------------------
def _picture(path: Path, colour=(200, 30, 30), caption: str | None = CAPTION, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIZE, SIZE), colour).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _sidecars_plus(root: Path, base: Path, extra) -> Path:
    """The good sidecar dataset of bad_inputs, then `extra(data folder)` adds the bad input."""
    config = _sidecar_tree(root, base)
    extra(root / "data")
    return config


def _link(target: str, name: str = "gone.png"):
    return lambda data: (data / name).symlink_to(data / target)


def _loop(data: Path) -> None:
    (data / "loop_a.png").symlink_to(data / "loop_b.png")
    (data / "loop_b.png").symlink_to(data / "loop_a.png")


def _folder_loop(data: Path) -> None:
    (data / "10_more").mkdir()
    (data / "10_more" / "up").symlink_to(data, target_is_directory=True)


def _repeat_folder(name: str):
    return lambda data: _picture(data / name / "extra.png")


def _only_zero_repeats(root: Path, base: Path) -> Path:
    _picture(root / "data" / "0_subject" / "a.png")
    return _config(root, base, metadata_path=None)


def _csv_tree(root: Path, base: Path, row: tuple[str, str], before=lambda data: None) -> Path:
    config = _tree(root, base)
    before(root / "data")
    names = _images(root / "data")
    _csv(root / "data" / "metadata.csv", [(n, f"sci lab {i}, consoles, neon light, digital art") for i, n in enumerate(names)]
         + [row])
    return config


def _outside(root: Path) -> str:
    _picture(root / "elsewhere.png", caption=None)
    return str(root / "elsewhere.png")


# --- refused by `lora-scripts train` ------------------------------------------------------------------------------
REFUSED: list[Refused] = [
    Refused("broken_link", "image that is a broken symbolic link", lambda r, b: _sidecars_plus(r, b, _link("deleted.png")),
            r"gone\.png: broken link \(points to .*deleted\.png, which does not exist\); fix or delete the link"),
    Refused("link_loop", "image links that point at each other (a link loop)", lambda r, b: _sidecars_plus(r, b, _loop),
            r"loop_a\.png: link loop \(the symbolic link leads back to itself\)"),
    Refused("folder_link_loop", "folder link back to a folder above it", lambda r, b: _sidecars_plus(r, b, _folder_loop),
            r"10_more/up: link loop \(it leads back to .*data, a folder above it\)"),
    Refused("zero_repeats_only", "only a 0_name repeat folder", _only_zero_repeats,
            r"no usable images found in .*0_subject: repeat count 0, so its 1 image is not trained \(kohya's sd-scripts "
            r"skips such folders too\)"),
    Refused("huge_repeats", "repeat folder 99999999_name", lambda r, b: _sidecars_plus(r, b, _repeat_folder("99999999_name")),
            r"99999999_name: repeat count 99999999 is too large \(at most 10000"),
    Refused("decimal_repeats", "repeat folder 2.5_name", lambda r, b: _sidecars_plus(r, b, _repeat_folder("2.5_name")),
            r"2\.5_name: repeat count 2\.5 is not a whole number; rename the folder to 2_name"),
    Refused("heic_image", "iPhone .heic photo (Pillow has no HEIC reader here)",
            lambda r, b: _sidecars_plus(r, b, lambda d: ((d / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic"),
                                                         (d / "phone.txt").write_text(CAPTION))),
            r"phone\.heic: cannot be read \(HEIC \(iPhone\) images need the pillow-heif plugin\); save it as PNG or JPEG"),
    Refused("caption_is_folder", "caption .txt that is a folder",
            lambda r, b: _sidecars_plus(r, b, lambda d: (_picture(d / "x.png", caption=None), (d / "x.txt").mkdir())),
            r"x\.txt: is a folder, not a caption file"),
    Refused("empty_image", "zero-byte image file", lambda r, b: _csv_tree(r, b, ("empty.png", CAPTION),
                                                                          lambda d: (d / "empty.png").write_bytes(b"")),
            r"empty\.png: empty file \(0 bytes\): an interrupted copy or download\?"),
    Refused("csv_empty_file_name", "metadata.csv row with an empty file_name", lambda r, b: _csv_tree(r, b, ("", CAPTION)),
            r"metadata\.csv line 10: empty file_name; give the image's path relative to"),
    Refused("csv_duplicate_row", "metadata.csv listing an image twice", lambda r, b: _csv_tree(r, b, ("img_03.png", CAPTION)),
            r"metadata\.csv line 10: img_03\.png is listed again \(first on line 5\); delete one row"),
    Refused("csv_parent_path", "metadata.csv file_name with ../ out of the data folder",
            lambda r, b: _csv_tree(r, b, ("../elsewhere.png", CAPTION), lambda d: _outside(r)),
            r"metadata\.csv line 10: file_name '\.\./elsewhere\.png' points outside train_data_dir"),
    Refused("csv_absolute_outside", "metadata.csv file_name: an absolute path outside the data folder",
            lambda r, b: _csv_tree(r, b, (_outside(r), CAPTION)),
            r"metadata\.csv line 10: file_name '.*elsewhere\.png' points outside train_data_dir"),
    Refused("csv_names_folder", "metadata.csv file_name that is a folder (x.png/)",
            lambda r, b: _csv_tree(r, b, ("x.png", CAPTION), lambda d: (d / "x.png").mkdir(parents=True)),
            r"x\.png: is a folder, not an image file"),
]


# --- accepted: read the way a viewer shows them -------------------------------------------------------------------
def _linked_repeat_folder(root: Path) -> Path:
    _picture(root / "elsewhere" / "subject" / "a.png")
    (root / "data").mkdir()
    (root / "data" / "10_subject").symlink_to(root / "elsewhere" / "subject", target_is_directory=True)
    return root / "data"


def _linked_image(root: Path) -> Path:
    _picture(root / "elsewhere" / "a.png", caption=None)
    (root / "data").mkdir()
    (root / "data" / "a.png").symlink_to(root / "elsewhere" / "a.png")
    (root / "data" / "a.txt").write_text(CAPTION)
    return root / "data"


def _one(root: Path, name: str, write) -> Path:
    data = root / "data"
    data.mkdir()
    write(data / name)
    (data / name).with_suffix(".txt").write_text(CAPTION, encoding="utf-8")
    return data


def _float_tiff(p: Path) -> None:
    Image.fromarray(np.tile(np.linspace(0.0, 1.0, SIZE, dtype=np.float32), (SIZE, 1))).save(p)


def _int32_tiff(p: Path) -> None:
    Image.fromarray(np.tile(np.linspace(0, 200000, SIZE).astype(np.int32), (SIZE, 1))).save(p)


def _ramp(samples) -> None:
    row = _pixels(samples)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all(), row


def _grey_alpha(p: Path) -> None:
    im = Image.new("LA", (SIZE, SIZE), (0, 0))
    im.paste((0, 255), (0, 0, SIZE // 2, SIZE))
    im.save(p)


def _black_left_white_right(samples) -> None:
    arr = _pixels(samples)
    assert (arr[:, : SIZE // 2] == 0).all() and (arr[:, SIZE // 2 :] == 255).all()


def _one_bit(p: Path) -> None:
    im = Image.new("1", (SIZE, SIZE), 1)
    im.paste(0, (0, 0, SIZE // 2, SIZE))
    im.save(p)


def _upper_txt(root: Path) -> Path:
    data = root / "data"
    _picture(data / "a.png", caption=None)
    (data / "a.TXT").write_text("an upper-case caption file, room, light, photo")
    return data


def _exif_rotated(p: Path) -> None:
    im = Image.new("RGB", (SIZE * 3 // 2, SIZE), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, SIZE * 3 // 2, SIZE // 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90° clockwise
    im.save(p, exif=exif, quality=95)


def _rotated(samples) -> None:
    assert samples[0].size == (SIZE, SIZE * 3 // 2)
    arr = _pixels(samples)
    assert arr[SIZE // 2, SIZE - 8, 2] > 200 and arr[SIZE // 2, 8, 0] > 200  # blue on the right, red on the left


def _windows_paths(root: Path) -> Path:
    data = root / "data"
    _picture(data / "10_sub" / "a.png", caption=None)
    _csv(data / "metadata.csv", [("10_sub\\a.png", CAPTION)])
    return data


def _absolute_inside(root: Path) -> Path:
    data = root / "data"
    _picture(data / "a.png", caption=None)
    _csv(data / "metadata.csv", [(str(data / "a.png"), CAPTION)])
    return data


def _apple_double(root: Path) -> Path:
    data = root / "data"
    _picture(data / "a.png")
    (data / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    _picture(data / ".ipynb_checkpoints" / "a-checkpoint.png")
    return data


def _names(expected):
    def check(samples) -> None:
        assert sorted((s.path.name, s.repeats) for s in samples) == expected, samples
    return check


ACCEPTED: list[Accepted] = [
    Accepted("linked_repeat_folder", "repeat folder that is a symbolic link (10_subject -> elsewhere)",
             "followed: its images are trained, 10 times each", _linked_repeat_folder, _names([("a.png", 10)])),
    Accepted("linked_image", "image that is a symbolic link", "the linked file is trained", _linked_image,
             lambda s: _near(s, (200, 30, 30))),
    Accepted("jfif", ".jfif JPEG", "read like any JPEG: every format Pillow opens is found",
             lambda r: _one(r, "photo.jfif", lambda p: Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(p, "JPEG")),
             lambda s: _near(s, (200, 30, 30))),
    Accepted("float_tiff", "floating-point TIFF (mode F, values 0-1)", "scaled to 0-255, not trained as black",
             lambda r: _one(r, "scan.tif", _float_tiff), _ramp),
    Accepted("int32_tiff", "32-bit integer TIFF (values beyond 16 bits)", "stretched from its minimum to its maximum",
             lambda r: _one(r, "depth.tif", _int32_tiff), _ramp),
    Accepted("grey_alpha_png", "grey PNG with transparency (LA)", "composited on white",
             lambda r: _one(r, "cut.png", _grey_alpha), _black_left_white_right),
    Accepted("one_bit_png", "1-bit black-and-white PNG", "black and white",
             lambda r: _one(r, "bw.png", _one_bit), _black_left_white_right),
    Accepted("exif_rotated", "JPEG with an EXIF rotation", "turned as a viewer shows it (size and pixels)",
             lambda r: _one(r, "phone.jpg", _exif_rotated), _rotated),
    Accepted("upper_case_txt", "caption file with an upper-case extension (a.TXT)", "used when there is no a.txt",
             _upper_txt, lambda s: _captions_are(s, ["an upper-case caption file, room, light, photo"])),
    Accepted("csv_windows_paths", "metadata.csv with Windows paths (10_sub\\a.png)",
             "found, with the folder's repeats", _windows_paths, _names([("a.png", 10)])),
    Accepted("csv_absolute_inside", "metadata.csv with absolute paths inside the data folder", "found",
             _absolute_inside, _names([("a.png", 1)])),
    Accepted("hidden_files", "macOS ._ files and .ipynb_checkpoints copies", "skipped (hidden), not named as broken",
             _apple_double, _names([("a.png", 1)])),
]


# --- `lora-scripts check` and `lora-scripts label` ----------------------------------------------------------------
LONG = "sci_lab, " + ", ".join(f"glowing console number {i} with blue light" for i in range(14)) + ", trigger_at_end"


def _check_argv(root: Path, base: Path, extra) -> list[str]:
    config = _sidecars_plus(root, base, extra)
    return ["check", "--config", str(config)]


def _long_caption(data: Path) -> None:
    (data / "img_00.txt").write_text(LONG, encoding="utf-8")


def _label_folder(root: Path) -> Path:
    _images(root / "imgs", n=2)
    return root / "imgs"


def _label(*extra: str, prepare=lambda folder: None):
    def make(root: Path, base: Path) -> list[str]:
        folder = _label_folder(root)
        prepare(folder)
        return ["label", str(folder)] + [e.format(folder=folder, root=root) for e in extra]
    return make


def _empty(root: Path, base: Path) -> list[str]:
    (root / "imgs").mkdir()
    (root / "imgs" / "readme.txt").write_text("captions go here")
    return ["label", str(root / "imgs")]


def _write_csv(text: bytes):
    return lambda folder: (folder / "metadata.csv").write_bytes(text)


COMMANDS: list[Command] = [
    Command("check_long_caption", "check: a caption longer than CLIP's 77 tokens",
            lambda r, b: _check_argv(r, b, _long_caption),
            r"1 captions are longer than the 75 tokens the text encoder reads; training cuts off their ends "
            r"\(\d+ tokens lost in all\): img_00\.txt \(\d+ tokens\)", code=0),
    Command("check_zero_repeats", "check: a 0_name repeat folder", lambda r, b: _check_argv(r, b, _repeat_folder("0_old")),
            r"0_old: repeat count 0, so its 1 image is not trained", code=0),
    Command("check_broken_link", "check: an image that is a broken link",
            lambda r, b: _check_argv(r, b, _link("deleted.png")), r"gone\.png: broken link", code=1),
    Command("label_empty_folder", "label: a folder without images", _empty,
            r"no images found in .*imgs \(sub-folders included, hidden ones skipped\); images are read in every "
            r"format Pillow opens: \.png, \.jpg"),
    Command("label_output_folder", "label --output: a folder", _label("--output", "{folder}"),
            r"--output .*imgs is a folder; give a file name, e.g\. .*imgs/metadata\.csv"),
    Command("label_output_not_csv", "label --output: not a .csv name", _label("--output", "{folder}/captions.png"),
            r"captions are written as a \.csv file"),
    Command("label_threshold", "label --threshold out of 0-1", _label("--threshold", "35"),
            r"--threshold 35\.0: a tag probability between 0 and 1"),
    Command("label_wd14_no_model", "label --backend wd14 --model: no such folder",
            _label("--backend", "wd14", "--model", "{root}/wd14"), r"--model .*wd14: no such folder"),
    Command("label_blip_model_file", "label --backend blip --model: a file",
            _label("--backend", "blip", "--model", "{folder}/img_00.png"), r"img_00\.png is a file; BLIP needs the model's folder"),
    Command("label_csv_not_utf8", "label: existing metadata.csv not UTF-8",
            _label(prepare=_write_csv("file_name,text\nimg_00.png,caf\xe9\n".encode("latin-1"))),
            r"metadata\.csv: not UTF-8 text \(byte 0xe9"),
    Command("label_csv_no_file_name", "label: existing metadata.csv without a file_name column",
            _label(prepare=_write_csv(b"image,caption\nimg_00.png,mine\n")),
            r"has no file_name column \(columns: \['image', 'caption'\]\); label would replace it"),
    Command("label_bad_template", "label --template with an unknown field", _label("--template", "{{trigger}}, {{colour}}"),
            r"--template '\{trigger\}, \{colour\}': unknown field \{colour\}\. Use the fields \{trigger\}"),
    Command("label_caption_not_utf8", "label: a sidecar caption not UTF-8",
            _label(prepare=lambda f: (f / "img_00.txt").write_bytes("caf\xe9".encode("cp1252"))),
            r"img_00\.txt: caption file is not UTF-8 \(byte 0xe9"),
]
