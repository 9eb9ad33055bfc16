"""Prompts with `<lora:NAME:WEIGHT>` tags -> images that carry their parameters: the engine behind
`lora-scripts generate`, strength sweeps and run comparisons.

The base model is loaded once; each LoRA file once (as a named diffusers adapter); every image then sets the
strengths its prompt asks for, and LoRAs the prompt does not mention are switched off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .families.loading import load_base_model
from .generate import SCHEDULERS, LoraSet, generate, make_pipeline
from .lora_index import DEFAULT_DIRS, index_loras, resolve
from .pnginfo import Parameters
from .prompts import parse_prompt


@dataclass
class Settings:
    steps: int = 30
    cfg: float = 7.0
    scheduler: str = "euler_a"
    size: tuple[int, int] | None = None  # (width, height); None = the model's native size
    negative: str = ""


@dataclass
class Rendered:
    image: Image.Image
    params: Parameters


@dataclass
class Renderer:
    base: Path
    lora_dirs: list[Path] = field(default_factory=lambda: list(DEFAULT_DIRS))
    settings: Settings = field(default_factory=Settings)

    def __post_init__(self) -> None:
        if self.settings.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.settings.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        self.model = load_base_model(self.base)
        self.pipe = make_pipeline(self.model, self.settings.scheduler)
        self.loras = LoraSet(self.pipe)
        self.index = index_loras(self.lora_dirs)
        self._model_hash: str | None = None
        self._lora_hashes: dict[tuple[Path, float], str] = {}  # by (file, mtime): a retrained file is hashed again

    def add_lora(self, name: str, path: Path) -> None:
        """Make a file known under a name (e.g. a run's LoRA for `compare`) without a folder scan."""
        self.index[name] = Path(path)

    def render(self, prompt: str, seeds: list[int]) -> list[Rendered]:
        text, refs = parse_prompt(prompt)
        weights = {name: 0.0 for name in self.loras.loaded}
        for ref in refs:
            self.loras.load(ref.name, resolve(ref.name, self.index, self.lora_dirs))
            weights[ref.name] = weights.get(ref.name, 0.0) + ref.weight  # A1111 adds repeated tags
        self.loras.apply(weights)
        s = self.settings
        size = s.size or (self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor,) * 2
        images = generate(self.pipe, text, seeds, steps=s.steps, cfg=s.cfg, negative=s.negative,
                          size=(size[1], size[0]))
        hashes = {r.name: self._lora_hash(r.name) for r in refs}
        return [Rendered(im, Parameters(prompt, s.negative, s.steps, s.scheduler, s.cfg, seed, size, self.base.stem,
                                        self.model_hash(), hashes)) for im, seed in zip(images, seeds)]

    def model_hash(self) -> str:
        if self._model_hash is None:
            from .hashes import file_sha256

            self._model_hash = file_sha256(self.base)[:10] if self.base.is_file() else ""
        return self._model_hash

    def _lora_hash(self, name: str) -> str:
        """A1111's LoRA short hash: the addnet hash (SHA-256 of the tensor bytes), 12 hex digits."""
        path = self.loras.loaded[name]
        key = (path, path.stat().st_mtime)
        if key not in self._lora_hashes:
            from .hashes import addnet_hash

            self._lora_hashes[key] = addnet_hash(path)[:12]
        return self._lora_hashes[key]
