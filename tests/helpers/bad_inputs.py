"""The bad-input catalogue: every case a creator can hit, the file that triggers it, and what we answer.

Used by tests/test_bad_inputs.py (one test per row) and to write docs/bad_inputs.md:

    python tests/helpers/bad_inputs.py > docs/bad_inputs.md

Refused cases run the real command line (`lora-scripts train --config ...`) in-process and record its
message; accepted cases (unusual but valid files) record how the image is read.
"""

from __future__ import annotations

import contextlib
import csv
import io
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

IMAGES = 8
SIZE = 64


@dataclass(frozen=True)
class Refused:
    """A case that must stop with a specific message and write nothing."""
    id: str
    case: str
    make: Callable[[Path, Path], Path]  # (root, tiny base) -> config file to train
    expect: str  # regex the message must match


@dataclass(frozen=True)
class Command:
    """Any command-line input (train, check, label, generate, merge, ...) that must end with one clear message,
    this exit code and no traceback."""
    id: str
    case: str
    make: Callable[[Path, Path], list[str]]  # (root, tiny base) -> argv after `lora-scripts`
    expect: str  # regex the message (stderr and stdout together) must match
    code: int = 2


@dataclass(frozen=True)
class Http:
    """A web-UI request that must be answered with this status and a message naming the input, never a 500."""
    id: str
    case: str
    send: Callable  # (TestClient, workspace root) -> httpx.Response; see helpers/bad_cases_ui.py
    status: int
    expect: str  # regex the response's `detail` must match


@dataclass(frozen=True)
class Accepted:
    """An unusual but valid input that must train, read the way a photo viewer shows it."""
    id: str
    case: str
    behaviour: str
    make: Callable[[Path], Path]  # root -> the data folder (sidecar captions)
    check: Callable[[list], None] = field(default=lambda samples: None)  # gets the scanned samples


# --- building blocks ------------------------------------------------------------------------------------------
def _images(folder: Path, n: int = IMAGES, size: int = SIZE) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        arr = np.broadcast_to(rng.integers(0, 255, 3, dtype=np.uint8), (size, size, 3)).copy()
        names.append(f"img_{i:02d}.png")
        Image.fromarray(arr).save(folder / names[-1])
    return names


def _csv(path: Path, rows, header=("file_name", "text"), encoding="utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _tree(root: Path, base: Path, extra_rows=(), **overrides) -> Path:
    """A good dataset with metadata.csv and a config; `overrides` change config keys (None removes one)."""
    data = root / "data"
    names = _images(data)
    _csv(data / "metadata.csv", [(n, f"sci lab {i}, consoles, neon light, digital art") for i, n in enumerate(names)]
         + list(extra_rows))
    return _config(root, base, **overrides)


def _config(root: Path, base: Path, **overrides) -> Path:
    cfg = {"train_data_dir": "./data", "metadata_path": "./data/metadata.csv", "base_model": str(base),
           "lora_rank": 4, "batch_size": 2, "epochs": 1, "learning_rate": "1e-4", "output_dir": "./output/run",
           "save_steps": 0, "resolution": SIZE, "bucket_reso_steps": 32}
    cfg.update(overrides)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}, sort_keys=False))
    return path


def _add_image(root: Path, base: Path, name: str, write: Callable[[Path], None], **overrides) -> Path:
    config = _tree(root, base, extra_rows=[(name, "one more image, bench, daylight, photo")], **overrides)
    write(root / "data" / name)
    return config


def _png_bytes(size: int = SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(mode: str = "RGB", color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (SIZE, SIZE), color)
    (im.convert("CMYK") if mode == "CMYK" else im).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG header announcing 20000x20000 px (400 Mpx) over a few bytes of data: the decompression-bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _kohya_lora(path: Path) -> None:
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(path))


def _sdxl_like(path: Path) -> None:
    """SDXL's two encoders but no label_emb: a damaged or partial SDXL file."""
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1),
               "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}, str(path))


def _sdxl_refiner(path: Path) -> None:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1),
               "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1)}, str(path))


def _unwritable(root: Path) -> str:
    """A folder nobody may write in, root included (root ignores file modes): Linux's /sys."""
    return "/sys/lora-scripts-test/run"


def _write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


# --- the catalogue ------------------------------------------------------------------------------------------
REFUSED = [
    Refused("truncated_png", "truncated PNG", lambda r, b: _add_image(r, b, "cut.png", _write(_png_bytes(256)[:300])),
            r"cut\.png: unreadable image \(file is truncated"),
    Refused("truncated_jpeg", "truncated JPEG", lambda r, b: _add_image(r, b, "cut.jpg", _write(_jpeg_bytes()[:400])),
            r"cut\.jpg: unreadable image \(file is truncated"),
    Refused("not_an_image", "a text file named .png", lambda r, b: _add_image(r, b, "notes.png", _write(b"shopping list\n")),
            r"notes\.png: unreadable image \(not an image or unsupported format\)"),
    Refused("huge_image", "20000x20000 image (decompression bomb)",
            lambda r, b: _add_image(r, b, "huge.png", _write(_huge_png())), r"huge\.png: image too large .*downscale it"),
    Refused("tiny_image", "16x16 image (at resolution 128)",
            lambda r, b: _add_image(r, b, "icon.png", lambda p: Image.new("RGB", (16, 16)).save(p), resolution=128),
            r"icon\.png: too small \(16x16\); it would be upscaled 8x"),
    Refused("empty_folder", "empty training folder",
            lambda r, b: ((r / "data").mkdir(), _config(r, b, metadata_path=None))[1], r"no usable images found in"),
    Refused("missing_caption", "image without a caption",
            lambda r, b: _sidecar_tree(r, b, missing_caption=True),
            r"img_00\.png: empty or missing caption \(in img_00\.txt\)"),
    Refused("caption_not_utf8", "caption .txt not UTF-8 (cp1252)",
            lambda r, b: _sidecar_tree(r, b, cp1252_caption=True), r"img_00\.txt: caption file is not UTF-8 \(byte 0xe9"),
    Refused("csv_not_utf8", "metadata.csv not UTF-8 (latin-1)", lambda r, b: _csv_latin1(r, b),
            r"metadata\.csv: not UTF-8 text \(byte 0xe9.*CSV UTF-8"),
    Refused("csv_no_file_name", "metadata.csv without a file_name column", lambda r, b: _csv_header(r, b, ("image", "text")),
            r"no 'file_name' column \(columns: \['image', 'text'\]\)"),
    Refused("csv_missing_file", "metadata.csv naming a missing file",
            lambda r, b: _tree(r, b, extra_rows=[("ghost.png", "a ghost, hallway, dim light, photo")]),
            r"ghost\.png: file not found"),
    Refused("yaml_syntax", "YAML syntax error", lambda r, b: _raw_yaml(r, b, "batch_size: [2\nepochs: 1\n"),
            r"not valid YAML at line 11, column 7: expected ',' or '\]', but got ':' \(while parsing a flow sequence at line 10\)"),
    Refused("unknown_key", "unknown key (typo)", lambda r, b: _tree(r, b, lora_rnak=8), r"lora_rnak: unknown key\. Did you mean 'lora_rank'\?"),
    Refused("wrong_type", "wrong type", lambda r, b: _tree(r, b, batch_size="four"),
            r"batch_size = 'four': Input should be a valid integer"),
    Refused("negative_lr", "negative learning rate", lambda r, b: _tree(r, b, learning_rate=-1e-4),
            r"learning_rate = -0\.0001: Input should be greater than 0 \(typical: 1e-4 to 2e-4\)"),
    Refused("rank_zero", "rank 0", lambda r, b: _tree(r, b, lora_rank=0),
            r"lora_rank = 0: Input should be greater than or equal to 1 \(typical: 8-32\)"),
    Refused("offload_without_checkpointing", "block swap without gradient checkpointing",
            lambda r, b: _tree(r, b, offload="blocks:20"),
            r"offload = 'blocks:20' needs gradient_checkpointing: true"),
    Refused("offload_nf4", "block swap with nf4 weights",
            lambda r, b: _tree(r, b, offload="blocks:20", gradient_checkpointing=True, base_weight_dtype="nf4"),
            r"offload = 'blocks:20' with base_weight_dtype = nf4: block swap moves plain weights; use "
            r"base_weight_dtype: fp8"),
    Refused("offload_form", "offload not in the form blocks:N", lambda r, b: _tree(r, b, offload="20"),
            r"offload = '20': expected none, auto or blocks:N with N >= 1"),
    Refused("batch_too_large", "batch larger than the dataset", lambda r, b: _tree(r, b, batch_size=16),
            r"batch_size 16 is larger than the dataset \(8 images counting repeats\).*Lower batch_size to 8"),
    Refused("base_missing", "base_model does not exist", lambda r, b: _tree(r, b, base_model=str(r / "v1-5-pruned.safetensors")),
            r"base_model = .*v1-5-pruned\.safetensors': file does not exist"),
    Refused("base_is_lora", "base_model is a LoRA file", lambda r, b: _bad_base(r, b, _kohya_lora),
            r"is a LoRA file, not a base model"),
    Refused("base_truncated", "base_model is a truncated .safetensors",
            lambda r, b: _bad_base(r, b, lambda p: p.write_bytes(b.read_bytes()[:5000])), r"corrupt, truncated"),
    Refused("base_sdxl", "base_model is an SDXL file without label_emb", lambda r, b: _bad_base(r, b, _sdxl_like),
            r"SDXL-layout checkpoint .* the file is incomplete"),
    Refused("base_sdxl_refiner", "base_model is the SDXL refiner", lambda r, b: _bad_base(r, b, _sdxl_refiner),
            r"is an SDXL refiner .*LoRAs are trained on the SDXL base"),
    Refused("base_random", "base_model is random bytes",
            lambda r, b: _bad_base(r, b, lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096))),
            r"corrupt, truncated|not a .*checkpoint"),
    Refused("output_unwritable", "output_dir not writable", lambda r, b: _tree(r, b, output_dir=_unwritable(r)),
            r"cannot write in .*choose a folder you own"),
    Refused("output_is_file", "output_dir inside a file", lambda r, b: _output_in_file(r, b), r"is a file, not a folder"),
]


def _sidecar_tree(root: Path, base: Path, missing_caption=False, cp1252_caption=False) -> Path:
    data = root / "data"
    for i, name in enumerate(_images(data)):
        txt = (data / name).with_suffix(".txt")
        if i == 0 and missing_caption:
            continue
        if i == 0 and cp1252_caption:
            txt.write_bytes("café lab, consoles, neon light, digital art".encode("cp1252"))
            continue
        txt.write_text(f"sci lab {i}, consoles, neon light, digital art", encoding="utf-8")
    return _config(root, base, metadata_path=None)


def _csv_latin1(root: Path, base: Path) -> Path:
    config = _tree(root, base)
    names = _images(root / "data")
    _csv(root / "data" / "metadata.csv", [(n, f"café lab {i}, neon, digital art") for i, n in enumerate(names)],
         encoding="latin-1")
    return config


def _csv_header(root: Path, base: Path, header) -> Path:
    config = _tree(root, base)
    _csv(root / "data" / "metadata.csv", [(n, "a caption") for n in _images(root / "data")], header=header)
    return config


def _raw_yaml(root: Path, base: Path, tail: str) -> Path:
    path = _tree(root, base)
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(("batch_size", "epochs"))]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def _bad_base(root: Path, base: Path, write: Callable[[Path], None]) -> Path:
    bad = root / "models" / "model.safetensors"
    bad.parent.mkdir(parents=True)
    write(bad)
    return _tree(root, base, base_model=str(bad))


def _output_in_file(root: Path, base: Path) -> Path:
    (root / "output").write_text("not a folder")
    return _tree(root, base, output_dir="./output/run")


# --- accepted inputs ------------------------------------------------------------------------------------------
def _one_image(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    write(data / name)
    (data / name).with_suffix(".txt").write_text("a test image, plain room, flat light, photo", encoding="utf-8")
    return data


def _pixels(samples) -> np.ndarray:
    from lora_scripts.data.images import open_rgb

    return np.asarray(open_rgb(samples[0].path), dtype=np.int16)


def _near(samples, rgb, tol=12) -> None:
    arr = _pixels(samples)
    assert np.abs(arr.reshape(-1, 3).mean(0) - rgb).max() < tol, arr.reshape(-1, 3).mean(0)


def _rgba(p: Path) -> None:
    im = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, SIZE // 2, SIZE))
    im.save(p)


def _palette_transparent(p: Path) -> None:
    im = Image.new("P", (SIZE, SIZE), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 0, SIZE // 2, SIZE))
    im.save(p, transparency=0)


def _half_blue_half_white(samples) -> None:
    arr = _pixels(samples)
    assert (arr[:, : SIZE // 2] == (0, 0, 255)).all() and (arr[:, SIZE // 2 :] == 255).all()


def _png16(p: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, SIZE).astype(np.uint16), (SIZE, 1))
    Image.fromarray(ramp).save(p)  # PIL writes mode I;16 as a 16-bit greyscale PNG


def _ramp_spans_full_range(samples) -> None:
    row = _pixels(samples)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def _gif(p: Path) -> None:
    frames = [Image.new("RGB", (SIZE, SIZE), c).convert("P") for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _csv_rows(root: Path, rows, encoding) -> Path:
    data = root / "data"
    names = _images(data, n=len(rows))
    _csv(data / "metadata.csv", [(n, text) for n, text in zip(names, rows)], encoding=encoding)
    return data


QUOTED = ['robot arm, "chrome", lab\nsecond line of the caption', "plain, caption"]

ACCEPTED = [
    Accepted("cmyk_jpeg", "CMYK JPEG", "converted to RGB (colours kept)",
             lambda r: _one_image(r, "print.jpg", _write(_jpeg_bytes("CMYK"))), lambda s: _near(s, (200, 30, 30))),
    Accepted("png_16bit", "16-bit PNG", "scaled to 8 bits (not clipped to white)",
             lambda r: _one_image(r, "scan.png", _png16), _ramp_spans_full_range),
    Accepted("rgba_png", "RGBA PNG with transparency", "composited on white",
             lambda r: _one_image(r, "cutout.png", _rgba), _half_blue_half_white),
    Accepted("palette_png", "palette PNG with a transparent index", "composited on white",
             lambda r: _one_image(r, "sprite.png", _palette_transparent), _half_blue_half_white),
    Accepted("animated_gif", "animated GIF", "first frame used, with a warning naming the file",
             lambda r: _one_image(r, "anim.gif", _gif), lambda s: _near(s, (200, 30, 30), tol=20)),
    Accepted("csv_bom", "metadata.csv with a byte-order mark (Excel)", "read as UTF-8; the header is recognised",
             lambda r: _csv_rows(r, ["a caption, one", "a caption, two"], "utf-8-sig"),
             lambda s: _captions_are(s, ["a caption, one", "a caption, two"])),
    Accepted("csv_quoted", "metadata.csv with quoted commas, quotes and newlines in captions", "captions kept exactly",
             lambda r: _csv_rows(r, QUOTED, "utf-8"), lambda s: _captions_are(s, QUOTED)),
]


def _captions_are(samples, expected) -> None:
    assert sorted(s.caption for s in samples) == sorted(expected)


def catalogue() -> tuple[list[Refused], list[Accepted], list[Command], list[Http]]:
    """Every case: the ones above and those of helpers/bad_cases_*.py (one module per area of the product)."""
    import importlib

    refused, accepted, commands, http = list(REFUSED), list(ACCEPTED), [], []
    for area in ("train", "data", "interop", "ui"):
        module = importlib.import_module(f"helpers.bad_cases_{area}")
        refused += getattr(module, "REFUSED", [])
        accepted += getattr(module, "ACCEPTED", [])
        commands += getattr(module, "COMMANDS", [])
        http += getattr(module, "HTTP", [])
    return refused, accepted, commands, http


# --- running a case -------------------------------------------------------------------------------------------
def output_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root/output with its size and modification time, and every folder."""
    out = root / "output"
    if not out.is_dir():
        return {}
    return {str(p.relative_to(out)): (0, 0) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in out.rglob("*")}


def run_refused(case: Refused, root: Path, base: Path) -> tuple[int, str, bool]:
    """Run `lora-scripts train --config ...` in-process; returns (exit code, message, whether anything under
    root/output was created, changed or removed)."""
    from lora_scripts.cli import main

    config = case.make(root, base)
    before = output_snapshot(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", str(config)])
    return code, err.getvalue(), output_snapshot(root) != before


def run_command(case: Command, root: Path, base: Path) -> tuple[int, str]:
    """Run `lora-scripts ARGV` in-process from `root`; returns (exit code, stderr + stdout)."""
    import os

    from lora_scripts.cli import main

    argv = case.make(root, base)
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's own refusals
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(cwd)
    return code, err.getvalue() + out.getvalue()


def run_http(case: Http, root: Path) -> tuple[int, str]:
    from helpers.bad_cases_ui import send

    return send(case, root)


def scan_accepted(case: Accepted, root: Path):
    from lora_scripts.config import validate_config
    from lora_scripts.data.scan import scan_dataset

    data = case.make(root)
    csv_path = data / "metadata.csv"
    config = validate_config({"train_data_dir": data, "metadata_path": csv_path if csv_path.is_file() else None,
                              "base_model": data, "output_dir": root / "out", "resolution": SIZE})
    return scan_dataset(config)


def printable(message: str, root: Path) -> str:
    """One table cell: the tmp folder shown as `…`, lines joined."""
    text = message.strip().removeprefix("error: ").replace(str(root), "…")
    return "<br>".join(line.strip().replace("|", "\\|") for line in text.splitlines() if line.strip())


def render(messages: dict[str, str]) -> str:
    refused, accepted, commands, http = catalogue()
    lines = ["# What each bad input gets", "",
             "Every row is a test (`tests/test_bad_inputs.py`). Refused inputs stop before anything is written to",
             "`output_dir` (all checks — output folder, dataset, base model — run before the first file is made);",
             "`skip_bad_images: true` turns the per-image refusals into warnings and trains on the rest.",
             "Regenerate with `python tests/helpers/bad_inputs.py > docs/bad_inputs.md`.", "",
             "## Refused, with this message (exit code 2)", "", "| Case | Message |", "|---|---|"]
    lines += [f"| {c.case} | {messages[c.id]} |" for c in refused]
    lines += ["", "## Other commands: one message, no traceback", "", "| Case | Exit code | Message |", "|---|---|---|"]
    lines += [f"| {c.case} | {c.code} | {messages[c.id]} |" for c in commands]
    lines += ["", "## Web UI: refused with a status and a message, never a 500", "",
              "| Case | Status | Message |", "|---|---|---|"]
    lines += [f"| {c.case} | {c.status} | {messages[c.id]} |" for c in http]
    lines += ["", "## Accepted, read the way a photo viewer shows them", "", "| Case | What happens |", "|---|---|"]
    lines += [f"| {c.case} | {c.behaviour} |" for c in accepted]
    return "\n".join(lines) + "\n"


def _all_messages() -> dict[str, str]:
    import tempfile

    from lora_scripts.families.tiny import write_tiny_checkpoint

    refused, _, commands, http = catalogue()
    messages = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = write_tiny_checkpoint(Path(tmp) / "models" / "tiny.safetensors", seed=0)
        for case in refused + commands + http:
            root = Path(tmp) / case.id
            root.mkdir()
            if isinstance(case, Refused):
                message = run_refused(case, root, base)[1]
            elif isinstance(case, Command):
                message = run_command(case, root, base)[1]
            else:
                message = run_http(case, root)[1]
            messages[case.id] = printable(message, root)
    return messages


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `helpers.bad_cases_*` as under pytest
    # The case modules build their cases with helpers.bad_inputs' classes, not this script's __main__ copies.
    from helpers import bad_inputs

    sys.stdout.write(bad_inputs.render(bad_inputs._all_messages()))
