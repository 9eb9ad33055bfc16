"""Prompts with `<lora:NAME:WEIGHT>` tags -> images that carry their parameters: the engine behind
`lora-scripts generate`, strength sweeps and run comparisons.

The base model is loaded once; each LoRA file once (as a named diffusers adapter); every image then sets the
strengths its prompt asks for, and LoRAs the prompt does not mention are switched off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..config import SEED_MAX
from ..errors import LoraScriptsError
from ..families import LoadSettings
from ..families.loading import load_base_model
from .control import ControlUnit, check_mode, model_hash as control_model_hash
from .ip_adapter import IpAdapterUnit
from .pipelines import SCHEDULERS, LoraSet, generate, make_pipeline
from .lora_lookup import DEFAULT_DIRS, index_loras, resolve
from .pnginfo import Parameters
from .prompts import parse_prompt


# Accepted ranges (inclusive) and what to say about them; the CLI's argparse types read the same table.
LIMITS = {
    "steps": (1, 500, "sampling steps", "typical: 20 to 40"),
    "cfg": (0.0, 30.0, "the guidance scale (cfg)", "typical: 5 to 8"),
    "side": (8, 2048, "an image side in pixels", "models draw best at their training size: 512 for SD1.x, 768 for SD2 768-v"),
    "seed": (0, SEED_MAX, "a seed", "any whole number; the same seed gives the same image"),
    "count": (1, 100, "images per prompt", "run the command again for more"),
    "step": (1, 10**9, "a checkpoint step", "the N of a run's checkpoints/step-N folder"),
}


def out_of_range(key: str, value: float) -> str | None:
    """None when `value` is acceptable for LIMITS[key], else why not (nan and inf are never acceptable)."""
    lo, hi, what, hint = LIMITS[key]
    if not math.isfinite(value) or not lo <= value <= hi:
        return f"{_number(value)} is not allowed for {what}: use {_number(lo)} to {_number(hi)} ({hint})"
    return None


def _number(value: float) -> str:
    """Whole numbers in full (a seed of 4294967295, not 4.29497e+09); others as short as they read."""
    if isinstance(value, int):
        text = str(value)
        return text if len(text) <= 20 else text[:12] + f"... ({len(text)} digits)"
    return f"{value:g}"


@dataclass
class Settings:
    steps: int | None = None  # None: the family's default (Flux.1-dev 28, schnell 4), else 30
    cfg: float | None = None  # None: the family's default (Flux.1-dev 3.5, schnell 0), else 7
    scheduler: str = "euler_a"
    size: tuple[int, int] | None = None  # (width, height); None = the model's native size
    negative: str = ""

    def __post_init__(self) -> None:
        """Every caller (CLI, web UI, compare) gets the same refusal instead of a sampler error or a black image."""
        problems = [f"{name} {why}" for name, key, v in (("steps", "steps", self.steps), ("cfg", "cfg", self.cfg))
                    if v is not None and (why := out_of_range(key, v))]
        for side in self.size or ():
            if why := out_of_range("side", side):
                problems.append(f"size {why}")
            elif side % 8:
                problems.append(f"size {side}: both sides must be multiples of 8 (the VAE works in 8-pixel cells)")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if problems:
            raise LoraScriptsError("; ".join(problems))


def check_seeds(seeds: list[int]) -> None:
    for seed in seeds:
        if why := out_of_range("seed", seed):
            span = f"the seeds run {seeds[0]} to {seeds[-1]}: " if len(seeds) > 1 else "seed "
            raise LoraScriptsError(f"{span}{why}")


@dataclass
class Rendered:
    image: Image.Image
    params: Parameters


@dataclass
class Renderer:
    base: Path
    lora_dirs: list[Path] = field(default_factory=lambda: list(DEFAULT_DIRS))
    settings: Settings = field(default_factory=Settings)
    # What the base predicts where its file does not say (SD2 single files), as in a training config.
    prediction_type: str = "auto"
    zero_terminal_snr: bool = False
    files: dict[str, Path] = field(default_factory=dict)  # a base's other files (Flux.1: clip_l, t5xxl, ae)
    tokenizer_dir: Path | None = None
    controls: list[ControlUnit] = field(default_factory=list)  # ControlNets every image is drawn with
    ip_adapter: IpAdapterUnit | None = None  # a reference image's look, through an IP-Adapter

    def __post_init__(self) -> None:
        self.model = load_base_model(self.base, LoadSettings(self.prediction_type, self.zero_terminal_snr,
                                                             files=self.files, tokenizer_dir=self.tokenizer_dir))
        # Steps and guidance a prompt is drawn with where the settings leave them open.
        self.defaults = {"steps": 30, "cfg": 7.0, **self.model.family.sample_defaults(self.model.variant)}
        defaults = self.defaults
        self.settings = replace(self.settings, steps=self.settings.steps if self.settings.steps is not None
                                else defaults["steps"], cfg=self.settings.cfg if self.settings.cfg is not None
                                else defaults["cfg"])
        self.pipe = make_pipeline(self.model, self.settings.scheduler)
        self._attach_ip_adapter()  # before the ControlNet pipeline, which then shares the image encoder
        self.control_pipe = self._control_pipeline()
        from ..interop.table import base_configs, module_table

        self.loras = LoraSet(self.pipe, self.model.family, module_table(base_configs(self.base)))
        self.index = index_loras(self.lora_dirs)
        self._model_hash: str | None = None
        self._lora_hashes: dict[tuple[Path, float], str] = {}  # by (file, mtime): a retrained file is hashed again

    def _attach_ip_adapter(self) -> None:
        unit = self.ip_adapter
        if unit is None:
            return
        from .control import model_hash as legacy_hash

        self.model.family.attach_ip_adapter(self.pipe, unit.model, unit.encoder_folder, self.model)
        self.pipe.set_ip_adapter_scale(unit.scale)
        self._ip_hash = legacy_hash(unit.model)

    def retune(self, controls: list[ControlUnit], ip_adapter: IpAdapterUnit | None) -> bool:
        """Take other weights, step ranges and IP-Adapter scale without loading anything again (the web UI's
        sliders). False, changing nothing, where the units differ otherwise (other files, images, maps)."""
        def key(u):
            return replace(u, weight=1.0, start=0.0, end=1.0)

        def ip_key(u):
            return None if u is None else replace(u, scale=1.0)

        if [key(u) for u in controls] != [key(u) for u in self.controls] or ip_key(ip_adapter) != ip_key(self.ip_adapter):
            return False
        self.controls = list(controls)
        if ip_adapter is not None:
            self.pipe.set_ip_adapter_scale(ip_adapter.scale)
        self.ip_adapter = ip_adapter
        return True

    def _control_pipeline(self):
        """The family's ControlNet pipeline over the same components (the LoRAs set on self.pipe act in it too);
        each ControlNet file loaded once however many units use it."""
        if not self.controls:
            return None
        nets: dict[Path, object] = {}
        for unit in self.controls:
            if unit.model not in nets:
                nets[unit.model] = self.model.family.load_controlnet(unit.model, self.model)
            check_mode(unit, nets[unit.model])
        self._control_hashes = {p: control_model_hash(p) for p in nets}
        self._maps: dict[tuple, list[Image.Image]] = {}
        return self.model.family.control_pipeline(self.pipe, [nets[u.model] for u in self.controls])

    def control_maps(self, size: tuple[int, int]) -> list[Image.Image]:
        """The maps the ControlNets see at this image size (width, height), made again only for another size or
        a control image changed on disk."""
        key = (size, tuple(u.image.stat().st_mtime_ns for u in self.controls))  # an image replaced on disk: anew
        if key not in self._maps:
            self._maps = {key: [u.control_map(size) for u in self.controls]}  # the latest only: a UI lives long
        return self._maps[key]

    def add_lora(self, name: str, path: Path) -> None:
        """Make a file known under a name (e.g. a run's LoRA for `compare`) without a folder scan."""
        self.index[name] = Path(path)

    def render(self, prompt: str, seeds: list[int]) -> list[Rendered]:
        check_seeds(seeds)
        text, refs = parse_prompt(prompt)
        weights = {name: 0.0 for name in self.loras.loaded}
        for ref in refs:
            self.loras.load(ref.name, resolve(ref.name, self.index, self.lora_dirs))
            weights[ref.name] = weights.get(ref.name, 0.0) + ref.weight  # A1111 adds repeated tags
        self.loras.apply(weights)
        s = self.settings
        size = s.size or self.model.native_size
        pipe, extra, info = self.pipe, {}, {}
        # Every ControlNet at weight 0 is no ControlNet: drawn without one (diffusers' Flux ControlNet pipeline
        # would otherwise draw the seed's noise after encoding the maps, another picture at weight 0).
        if any(u.weight for u in self.controls):
            pipe = self.control_pipe
            extra = self.model.family.control_call(self.control_maps(size), [u.weight for u in self.controls],
                                                   [u.start for u in self.controls], [u.end for u in self.controls],
                                                   [u.mode for u in self.controls])
        if self.controls:
            info = {f"ControlNet {i}": u.infotext(size, self._control_hashes[u.model])
                    for i, u in enumerate(self.controls)}
        if self.ip_adapter is not None:
            extra["ip_adapter_image"] = self.ip_adapter.read_image()
            info[f"ControlNet {len(self.controls)}"] = self.ip_adapter.infotext(  # the extension's numbering
                self.pipe.image_encoder.config.projection_dim, self._ip_hash)
        extra.update(self.model.family.pipeline_options(self.model, LoadSettings()))
        images = generate(pipe, text, seeds, steps=s.steps, cfg=s.cfg, negative=s.negative, size=(size[1], size[0]),
                          **extra)
        hashes = {r.name: self._lora_hash(r.name) for r in refs}
        return [Rendered(im, Parameters(prompt, s.negative, s.steps, s.scheduler, s.cfg, seed, size, self.base.stem,
                                        self.model_hash(), hashes, info)) for im, seed in zip(images, seeds)]

    def model_hash(self) -> str:
        if self._model_hash is None:
            from ..hashes import file_sha256

            self._model_hash = file_sha256(self.base)[:10] if self.base.is_file() else ""
        return self._model_hash

    def _lora_hash(self, name: str) -> str:
        """A1111's LoRA short hash: the addnet hash (SHA-256 of the tensor bytes), 12 hex digits."""
        path = self.loras.loaded[name]
        key = (path, path.stat().st_mtime)
        if key not in self._lora_hashes:
            from ..hashes import addnet_hash

            self._lora_hashes[key] = addnet_hash(path)[:12]
        return self._lora_hashes[key]
