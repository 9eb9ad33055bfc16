"""An IP-Adapter at generation: the look of a reference image, at a scale, beside the prompt, LoRAs and
ControlNets; checked before the base model loads, recorded in PNG info as A1111's ControlNet extension records
an IP-Adapter unit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import LoraScriptsError
from .control import read_rgb, unit_infotext

# The extension's preprocessor for each encoder, by its projection width (ViT-H: SD1.5 and the *_vit-h files).
_MODULES = {1024: "ip-adapter_clip_h", 1280: "ip-adapter_clip_g"}


@dataclass(frozen=True)
class IpAdapterUnit:
    model: Path  # ip-adapter_sd15.safetensors, ...
    image: Path  # the reference image
    scale: float = 1.0
    encoder: Path | None = None  # the CLIP vision encoder folder; None: image_encoder beside the model

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and 0.0 <= self.scale <= 2.0):
            raise LoraScriptsError(f"--ip-scale {self.scale:g}: use 0 to 2 (0 = off, 1 = as trained; 0.5-0.8 keeps "
                                   "more of the prompt)")
        if not self.model.is_file():
            raise LoraScriptsError(f"--ip-adapter {self.model} does not exist; give the IP-Adapter file "
                                   "(e.g. ip-adapter_sd15.safetensors)")
        if not self.encoder_folder.is_dir():
            raise LoraScriptsError(f"no image encoder for {self.model.name}: {self.encoder_folder} is not a folder. "
                                   "Give the CLIP vision encoder folder (config.json and weights; models/image_encoder "
                                   "in the IP-Adapter repository) with --ip-encoder")

    @property
    def encoder_folder(self) -> Path:
        return self.encoder or self.model.parent / "image_encoder"

    def read_image(self) -> Image.Image:
        return read_rgb(self.image, "--ip-image")

    def infotext(self, projection_dim: int, model_hash: str) -> str:
        """As the extension writes an IP-Adapter unit: a ControlNet unit whose module is the image encoder."""
        return unit_infotext(_MODULES.get(projection_dim, "ip-adapter-auto"), f"{self.model.stem} [{model_hash}]",
                             self.scale, 512)

def parse_unit(model: str | None, image: str | None, scale: float | None, encoder: str | None) -> IpAdapterUnit | None:
    if model is None:
        if image or scale is not None or encoder:
            raise LoraScriptsError("--ip-image/--ip-scale/--ip-encoder need --ip-adapter MODEL "
                                   "(e.g. --ip-adapter models/ipadapter/ip-adapter_sd15.safetensors)")
        return None
    if not image:
        raise LoraScriptsError("--ip-adapter needs a reference image: --ip-image IMG")
    unit = IpAdapterUnit(Path(model), Path(image), 1.0 if scale is None else scale, Path(encoder) if encoder else None)
    unit.read_image()
    return unit
