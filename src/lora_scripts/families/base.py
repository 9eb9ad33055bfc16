"""What a model family is and what the rest of the package may ask of it.

A family is the one place that knows how its checkpoints look, how to load them offline, how a prompt
becomes conditioning, what the training target is, which layers take LoRA and what they are called in a
kohya file, and which pipeline draws images. The trainer, validation, caches, generation and interop talk
to this interface; they never name a family or one of its component classes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Conditioning:
    """What the text encoders give the denoiser for a batch of prompts; what the text cache stores.

    hidden: (batch, tokens, width) cross-attention input. extras: pooled embeddings, extra ids, for families
    that have them (none for SD1/SD2)."""

    hidden: Tensor
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    def to(self, device, dtype: torch.dtype | None = None) -> Conditioning:
        return Conditioning(self.hidden.to(device, dtype), {k: v.to(device, dtype) for k, v in self.extras.items()})

    def rows(self) -> list[Conditioning]:
        """One Conditioning per sample (batch dimension kept, length 1 dropped), for a per-caption cache."""
        return [Conditioning(self.hidden[i], {k: v[i] for k, v in self.extras.items()})
                for i in range(self.hidden.shape[0])]

    @staticmethod
    def stack(rows: list[Conditioning]) -> Conditioning:
        keys = rows[0].extras.keys()
        return Conditioning(torch.stack([r.hidden for r in rows]), {k: torch.stack([r.extras[k] for r in rows]) for k in keys})


@dataclass(frozen=True)
class LoadSettings:
    """What a user may say about a base model that its file cannot (see config.py for the keys)."""

    prediction_type: str = "auto"  # auto | epsilon | v_prediction
    zero_terminal_snr: bool = False
    # Only the weights matter (verify, bake, name tables): an objective the file does not state is not asked for.
    weights_only: bool = False
    # Load the weights straight in this dtype (the training dtype): an SDXL loaded in fp32 and then cast would
    # need 14 GB of host RAM at once, more than many users have. None: as diffusers loads them (fp32).
    dtype: torch.dtype | None = None
    # Families whose base is several files (Flux.1 as ComfyUI keeps it): the others by kind ("clip_l", "t5xxl",
    # "ae"), and where a tokenizer no package ships is (the T5 one).
    files: Mapping[str, Path] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    # The flow-matching objective's choices (families/flow_matching.py) and the guidance a guidance-distilled
    # model (Flux.1-dev) is trained at; the DDPM families ignore them.
    timestep_sampling: str = "flux_shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    loss_weighting: str = "none"
    guidance_scale: float = 1.0
    max_sequence_length: int | None = None  # T5 tokens (None: the family's default)


@dataclass(frozen=True)
class CaptionLimit:
    """What of a caption the denoiser is given: the tokenizer that counts it, how many tokens (special ones
    excluded) it reads, which encoder that is (for messages), and the config change that reads more ('' if none)."""

    tokenizer: Any
    tokens: int
    reader: str
    more: str = ""


@dataclass(frozen=True)
class ModuleEntry:
    """A layer a LoRA can target: its kohya name (what A1111 and ComfyUI look up), its component and module path
    (what peft uses), and where its weight lives in the original single-file checkpoint. `rows` is set where
    the single file fuses several layers into one weight (OpenCLIP's q/k/v in_proj): the slice this layer is."""

    component: str
    path: str
    ldm_key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    fused_shape: tuple[int, ...] | None = None  # the fused weight's shape, where rows is set
    # Where the kohya module itself is the fused weight (Flux's qkv): each layer it holds, (path, output rows),
    # in row order; `path` is then the first of them and `shape` the fused weight's (formats/fused.py).
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def ldm_shape(self) -> tuple[int, ...]:
        """The shape the single file's weight must have for this layer to fit."""
        return self.fused_shape or self.shape


class Model:
    """A loaded base model: its networks by component name, its tokenizers, its noise schedule and objective."""

    def __init__(self, family: "Family", source: Path, modules: dict[str, nn.Module], tokenizers: dict[str, Any],
                 schedule: Any, objective: Any, objective_reason: str = ""):
        self.family = family
        self.source = source
        self.modules = modules
        self.tokenizers = tokenizers
        self.schedule = schedule  # the diffusers scheduler the model was trained with (sampling starts from it)
        self.objective = objective
        self.objective_reason = objective_reason  # why this objective: the log says it
        self.native_resolution = family.default_resolution  # the side it draws best at (families set it on load)
        self.token_chunks = 1  # 75-token windows a caption is read in (max_token_length / 75; set by the trainer)
        self.predict_options: dict[str, Any] = {}  # what Family.predict takes beyond the batch (Flux: guidance)
        self.variant = ""  # a family's model variant where LoRA files name it (Flux.1: dev or schnell)

    @property
    def native_size(self) -> tuple[int, int]:
        return (self.native_resolution, self.native_resolution)

    @property
    def denoiser(self) -> nn.Module:
        return self.modules[self.family.denoiser]

    @property
    def vae(self) -> nn.Module:
        return self.modules[self.family.autoencoder]

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return {name: self.modules[name] for name in self.family.text_encoders}

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type


class Family:
    """Base class: the metadata every family has, and the methods a trainable family implements."""

    name: str  # our id, e.g. "sd15"
    label: str  # what users call it, for messages
    lora_label: str  # what `inspect` and the web UI call a LoRA file of this family
    denoiser: str = "unet"  # component names, as peft/diffusers and our checkpoints call them
    text_encoders: tuple[str, ...] = ("text_encoder",)
    autoencoder: str = "vae"
    denoiser_label: str = "UNet"  # for messages
    default_resolution: int = 512
    config_package: str | None = None  # package holding unet.json, vae.json, ...
    config_files: tuple[str, ...] = ()

    def embedded_configs(self) -> dict[str, dict[str, Any]]:
        """Real-size component configs shipped in the package, so nothing is fetched from a hub."""
        if self.config_package is None:
            raise ValueError(f"{self.label} has no embedded configs")
        root = resources.files(self.config_package)
        return {c: json.loads(root.joinpath(f"{c}.json").read_text()) for c in self.config_files}

    def recognise_configs(self, configs: dict[str, dict[str, Any]]) -> bool:
        """Whether a set of component configs (a diffusers folder's, at any size) is of this family."""
        raise NotImplementedError

    def trainable(self, train_text_encoder: bool) -> tuple[str, ...]:
        """Components that take LoRA: the denoiser first (it trains first), then the text encoders if asked."""
        return (self.denoiser,) + (self.text_encoders if train_text_encoder else ())

    def fused_slot(self, component: str, module_path: str) -> tuple[int, tuple[int, ...]] | None:
        """Where a layer is one part of a fused kohya module (Flux's qkv): (its index, the row ratios of all
        parts). None for an ordinary layer (every layer of the SD families)."""
        return None

    def unstored_layers(self, component: str) -> tuple[str, ...] | None:
        """Name patterns (re.search on module paths) of a component's frozen layers that base_weight_dtype /
        text_encoder_weight_dtype keep in the compute dtype. None: diffusers' layerwise-casting defaults (norms,
        position/patch embeddings, ^proj_in$/^proj_out$) and the model's own skip patterns."""
        return None

    def offload_units(self, denoiser: nn.Module) -> list[nn.Module]:
        """The denoiser's blocks a block swap (offload: blocks:N) moves: those gradient checkpointing recomputes
        one at a time, since a swapped block is loaded when its forward starts (its recomputation included)."""
        raise NotImplementedError(f"{self.label} has no block map for offload")

    def training_metadata(self, config) -> dict[str, Any]:
        """ss_* keys of this family's own training options, as sd-scripts records them (none for SD)."""
        return {}

    def lora_block(self, kohya_name: str) -> str | None:
        """The denoiser block a kohya module name lies in, for `inspect`'s per-block counts (None: not this
        family's denoiser name)."""
        return None

    def file_kind(self, shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
        """For a family whose base is several files: (the config key a file with these keys is given as, or None;
        what it is in words). (None, "") for a family whose single file holds everything."""
        return None, ""

    def companion_files(self, path: Path) -> dict[str, Path | None]:
        """For a base kept as several files: the others, by config key, found beside it (None: not found); {} for
        a family whose single file holds everything."""
        return {}

    def sample_defaults(self, variant: str = "") -> dict[str, Any]:
        """Sampling steps and guidance a model of this family (and variant) is drawn with where the user does
        not say ({}: the caller's own defaults, as for SD)."""
        return {}

    def predict_options(self, configs: dict[str, dict[str, Any]], settings: LoadSettings) -> dict[str, Any]:
        """What `predict` takes beyond the batch for a model of these configs (Flux.1-dev: its guidance)."""
        return {}

    def pipeline_options(self, model: Model, settings: LoadSettings) -> dict[str, Any]:
        """What this family's pipeline is called with so that images are drawn with the conditioning training
        gives (Flux.1: the T5 sequence length); {} for SD."""
        return {}

    def caption_limit(self, path: Path | None, settings: LoadSettings, max_token_length: int) -> CaptionLimit | None:
        """How much of a caption training reads, told without loading the model (for `check`); None where it
        cannot be told. SD families: CLIP's 75-token windows (max_token_length of them in all)."""
        from .clip_tokenizer import tokenizer_for

        tokens = max_token_length or 75
        more = "set max_token_length: 225 to read up to 225 tokens" if tokens < 225 else ""
        return CaptionLimit(tokenizer_for(path), tokens, "the text encoder", more)

    def file_configs(self, path: Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
        """The component configs of a single-file base: its own where it carries them (our test and toy files),
        else the family's embedded ones."""
        key = "lora_scripts.architecture"  # stable_diffusion.ARCHITECTURE_KEY (not imported: it imports this module)
        return json.loads(metadata[key]) if key in metadata else self.embedded_configs()

    # --- generation with control -----------------------------------------------------------------------------
    def load_controlnet(self, path: Path, model: Model) -> nn.Module:
        """A ControlNet file or folder for this model, in its dtype and on its device."""
        from ..errors import LoraScriptsError

        raise LoraScriptsError(f"ControlNet is not available for {self.label} in this tool yet (SD1.x, SD2.x, "
                               "SDXL and Flux.1 have it)")

    def control_call(self, maps: list, weights: list[float], starts: list[float], ends: list[float],
                     modes: list[int | None]) -> dict[str, Any]:
        """The ControlNet pipeline's arguments for these units (one map, weight, start, end and union mode each;
        the SD pipelines have no union modes: check_mode refuses one there)."""
        return {"image": maps, "controlnet_conditioning_scale": weights, "control_guidance_start": starts,
                "control_guidance_end": ends}

    def attach_ip_adapter(self, pipe, path: Path, encoder: Path, model: Model) -> None:
        """Load an IP-Adapter file and its image encoder (a local folder) into `pipe`."""
        from ..errors import LoraScriptsError

        raise LoraScriptsError(f"IP-Adapter is not available for {self.label} in this tool yet (SD1.x, SD2.x and "
                               "SDXL have it)")

    def control_pipeline(self, pipe, controlnets: list[nn.Module]):
        """The family's ControlNet pipeline sharing `pipe`'s components (LoRAs and IP-Adapters loaded there
        included), with these ControlNets."""
        raise NotImplementedError

    def base_shapes(self, path: Path, files: Mapping[str, Path] | None = None) -> dict[str, tuple[int, ...]]:
        """Key -> shape of a single-file base, the names A1111 and ComfyUI resolve a LoRA's modules against."""
        from .loading import read_checkpoint_info

        return read_checkpoint_info(path).shapes

    def __repr__(self) -> str:
        return f"<family {self.name}>"
