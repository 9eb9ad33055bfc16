"""Shared fixtures: a tiny SD1.x single-file checkpoint and small image sets, all built on the fly."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

# Under pytest-xdist two workers share the 2 cores: one torch thread each (set before torch is imported, and
# inherited by the subprocesses tests start), instead of four threads fighting over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from lora_scripts.families.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-sd15.safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_ckpt(tmp_path_factory) -> Path:
    """A tiny SD2 768-v-style single file: OpenCLIP text encoder layout, linear projections, v-prediction (its
    embedded scheduler config says so, as a real 768-v file would need prediction_type: v_prediction)."""
    from lora_scripts.families.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-sd2-v.safetensors", seed=0,
                                 family="sd2", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd2_base_folder(tmp_path_factory) -> Path:
    """A tiny SD2 512-base-style (epsilon) model as a diffusers folder."""
    from lora_scripts.families.tiny import write_tiny_folder

    return write_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-sd2-base", seed=1, family="sd2",
                             prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(tmp_path_factory) -> Path:
    """A tiny SDXL in the SGM single-file layout: CLIP-L and OpenCLIP-bigG of different widths (32 and 64, with
    a 48-wide projection), 10 layers in the second, the real UNet block structure with text_time embedding."""
    from lora_scripts.families.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-sdxl.safetensors", seed=0, family="sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    """The same tiny SDXL (same seed) as a diffusers folder."""
    from lora_scripts.families.tiny import write_tiny_folder

    return write_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0, family="sdxl")


@pytest.fixture(scope="session")
def tiny_flux_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Flux.1-dev as ComfyUI users keep it: transformer (BFL layout), clip_l, t5xxl, ae, and a T5
    tokenizer folder; config key -> path (base_model is the transformer)."""
    from lora_scripts.families.tiny import write_tiny_flux_files

    return write_tiny_flux_files(tmp_path_factory.mktemp("models") / "flux", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_folder(tmp_path_factory) -> Path:
    """The same tiny Flux.1-dev (same seed) as a diffusers folder, T5 tokenizer included."""
    from lora_scripts.families.tiny import write_tiny_folder

    return write_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-flux", seed=0, family="flux1")


def flux_keys(files: dict[str, Path]) -> dict[str, str]:
    """seed_config overrides pointing a config at tiny_flux_files."""
    return {k: str(v) for k, v in files.items()}


BASES = ("tiny_ckpt", "tiny_sd2_ckpt", "tiny_sdxl_ckpt")  # one fixture name per SD family, for tests parametrised by family
TRAIN_BASES = BASES + ("tiny_flux_folder",)  # every family, for training-loop tests (resume, DDP)


def make_images(folder: Path, n: int, size=(32, 32), seed: int = 0, captions: bool = True) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = size
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:] = rng.integers(0, 255, 3)
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)
        name = f"img_{i:03d}.png"
        Image.fromarray(arr).save(folder / name)
        names.append(name)
    return names


def write_metadata(path: Path, rows: list[tuple[str, str]], text_col: str = "text") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", text_col])
        w.writerows(rows)
    return path


def write_dataset(root: Path) -> Path:
    """8 images of 32 px with a metadata.csv, in root/data/sci_lab_train (where seed_config points)."""
    folder = root / "data" / "sci_lab_train"
    names = make_images(folder, 8)
    write_metadata(folder / "metadata.csv",
                   [(n, f"sci lab {i}, glowing consoles, neon lighting, digital art") for i, n in enumerate(names)])
    return folder


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path)


def seed_config(tmp_path: Path, base: Path, **overrides) -> Path:
    """The issue's sci_lab.yaml with its nine keys, pointed at test data; small sizes for a CPU."""
    cfg = {
        "train_data_dir": "./data/sci_lab_train",
        "metadata_path": "./data/sci_lab_train/metadata.csv",
        "base_model": str(base),
        "lora_rank": 16,
        "batch_size": 4,
        "epochs": 15,
        "learning_rate": "2e-4",
        "output_dir": "./output/sci_lab_lora",
        "save_steps": 100,
        "resolution": 32,
        "bucket_reso_steps": 32,
    }
    cfg.update(overrides)
    path = tmp_path / "sci_lab.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
