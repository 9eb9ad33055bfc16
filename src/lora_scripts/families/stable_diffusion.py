"""What SD1.x and SD2.x share: a UNet2DConditionModel denoiser conditioned on one CLIP-type text encoder's
last hidden states, an AutoencoderKL, a DDPM noise schedule and StableDiffusionPipeline. sd15.py and sd2.py
state only how they differ (text-encoder layout in single files, tokenizer padding, prediction type).
"""

from __future__ import annotations

import re

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from torch import Tensor, nn

from ..errors import ConfigError, ModelLoadError
from ..formats.kohya import UNET_PREFIX as KOHYA_UNET, kohya_module_name, unet_name_from_ldm
from ..formats.open_clip import OPEN_CLIP_PREFIX, open_clip_weight_of
from ..formats.ldm import CLIP_PREFIX, UNET_PREFIX, _unet_key, clip_to_ldm, unet_to_ldm, vae_to_ldm, with_text_model
from .base import Conditioning, Family, LoadSettings, Model, ModuleEntry
from .clip_tokenizer import write_clip_tokenizer_files
from .long_prompts import chunked_ids, join_windows
from .objective import PREDICTION_TYPES, DiffusionObjective

# Safetensors metadata key under which our own small checkpoints carry their component configs.
ARCHITECTURE_KEY = "lora_scripts.architecture"

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
}
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
_TE_PRESETS = {"kohya": _TE_ATTN + ("fc1", "fc2"), "attn": _TE_ATTN, "qv": ("q_proj", "v_proj")}
_UNET_SUFFIXES = {"attn": _ATTN, "qv": ("to_q", "to_v")}
_CONV_SCOPES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # sd-scripts' UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
TARGET_HINT = ("UNet layer names end in to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2; "
               "text-encoder ones in q_proj, k_proj, v_proj, out_proj, fc1, fc2. Or use a preset: kohya, attn, qv")


class SDModel(Model):
    """diffusers' names for SD's parts, for code inside families/ and for tests."""

    @property
    def unet(self):
        return self.modules["unet"]

    @property
    def text_encoder(self):
        return self.modules["text_encoder"]

    @property
    def tokenizer(self):
        return self.tokenizers["tokenizer"]

    @property
    def noise_scheduler(self) -> DDPMScheduler:
        return self.schedule


def _is_linear_or_1x1(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


class StableDiffusionFamily(Family):
    config_files = ("unet", "vae", "text_encoder", "scheduler")
    pad_token = "<|endoftext|>"  # how the tokenizer pads (SD2's OpenCLIP pads with "!")
    # Tokenizer folder of each text encoder, and how that tokenizer pads (SDXL has two).
    tokenizer_folders = {"text_encoder": "tokenizer"}
    pipeline_class = StableDiffusionPipeline
    control_pipeline_class = StableDiffusionControlNetPipeline
    model_index = _MODEL_INDEX
    text_time = False  # SDXL's UNet takes pooled text and size ids (label_emb in single files)
    base_model_version: str
    v2: bool
    modelspec_architecture: str
    cross_attention_dim: int  # the real model's text width: 768 SD1, 1024 SD2
    text_encoder_act: str  # OpenAI CLIP (SD1) uses quick_gelu, OpenCLIP (SD2) gelu: tells them apart at any size

    # --- recognising ----------------------------------------------------------------------------------------
    def lora_block(self, kohya_name: str) -> str | None:
        """diffusers' (down_blocks_1) or the original layout's (input_blocks_4) block, as unet.down_1 / unet.input_4."""
        if m := re.match(r"lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+|input_blocks_\d+|middle_block|output_blocks_\d+)",
                         kohya_name):
            return "unet." + m[1].replace("_blocks_", "_").replace("_block", "")
        return None

    def recognise(self, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> bool:
        raise NotImplementedError

    def recognise_folder(self, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> bool:
        # Any pipeline class saved over these components (StableDiffusionPipeline, Img2Img, DiffusionPipeline):
        # the components decide, as they did before families were modules.
        return "unet" in configs and self.recognise_configs(configs)

    def recognise_configs(self, configs: dict[str, dict[str, Any]]) -> bool:
        return (configs.get("text_encoder", {}).get("hidden_act") == self.text_encoder_act
                and "text_encoder_2" not in configs)

    # --- loading --------------------------------------------------------------------------------------------
    def load(self, path: Path, metadata: dict[str, str], settings: LoadSettings) -> SDModel:
        if path.is_dir():
            pipe = self.pipeline_class.from_pretrained(str(path), local_files_only=True, torch_dtype=settings.dtype,
                                                       **self._pipeline_extras())
            # The folder's own scheduler_config.json, not the loaded config: diffusers fills a missing key with
            # its default (epsilon), which would be a silent guess for an SD2 folder that does not say.
            said = self.stated_prediction_type(path, {}), f"{path.name}/scheduler/scheduler_config.json says so"
            kind, reason = self.resolve_prediction_type(settings, said, path)
        else:
            # Decided before the load (seconds to a minute): a file that does not say is refused at once.
            kind, reason = self.resolve_prediction_type(settings, self.file_prediction_type(path, metadata), path)
            configs = json.loads(metadata[ARCHITECTURE_KEY]) if ARCHITECTURE_KEY in metadata else self.embedded_configs()
            pipe = self._load_single_file(path, configs, settings.dtype)
        zero_snr = settings.zero_terminal_snr
        said_zero = "" if zero_snr or kind != "v_prediction" else self.stated_zero_terminal_snr(path, metadata)
        if said_zero:  # a v-prediction base that says it was trained to SNR 0 is sampled and trained that way
            zero_snr, reason = True, f"{reason}; {said_zero}"
        settings = replace(settings, zero_terminal_snr=zero_snr)
        if settings.zero_terminal_snr and kind != "v_prediction":
            raise ConfigError("the config", [f"zero_terminal_snr = true with an {kind} model ({reason}): at SNR 0 "
                                             "the epsilon target carries no information about the image; set "
                                             "prediction_type: v_prediction (a v-prediction base) or zero_terminal_snr: false"])
        # Always stated: a folder's own rescale_betas_zero_snr must not slip past the check above.
        schedule = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=kind,
                                             rescale_betas_zero_snr=settings.zero_terminal_snr)
        if settings.zero_terminal_snr and not said_zero:
            reason += "; zero_terminal_snr: true rescales the schedule to SNR 0 at its last step (Lin et al. 2023)"
        modules = {n: getattr(pipe, n) for n in (self.denoiser, self.autoencoder) + self.text_encoders}
        tokenizers = {t: getattr(pipe, t) for t in self.tokenizer_folders.values()}
        model = SDModel(self, path, modules, tokenizers, schedule, DiffusionObjective(schedule), reason)
        # A real single file loads with the embedded configs, whose UNet sample_size is one variant's (SD2: 768);
        # its objective tells 512-base from 768-v. Folders and our own files carry their own size.
        embedded = not path.is_dir() and ARCHITECTURE_KEY not in metadata
        size = self.resolution_for(kind) if embedded else pipe.unet.config.sample_size * pipe.vae_scale_factor
        model.native_resolution = size
        return model

    def file_prediction_type(self, path: Path, metadata: dict[str, str]) -> tuple[str | None, str]:
        """What a single file says about its objective, and why we believe it."""
        return self.prediction_type_in_file(metadata)

    def stated_zero_terminal_snr(self, path: Path, metadata: dict[str, str]) -> str:
        """Why we believe the base was trained with a zero-terminal-SNR schedule ("" where it does not say): a
        folder's scheduler config (rescale_betas_zero_snr), or what a single file of the family says."""
        if path.is_dir():
            try:
                cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
            except (OSError, ValueError):
                return ""
            return ("its scheduler config says it was trained with zero terminal SNR (rescale_betas_zero_snr)"
                    if cfg.get("rescale_betas_zero_snr") else "")
        return self.file_zero_terminal_snr(path, metadata)

    def file_zero_terminal_snr(self, path: Path, metadata: dict[str, str]) -> str:
        """Why a single file says it was trained to zero terminal SNR ("" where it does not; SD1/SD2 never do)."""
        return ""

    def prediction_type_in_file(self, metadata: dict[str, str]) -> tuple[str | None, str]:
        """What a single file says about its objective: our own files carry their scheduler config; files
        written with modelspec metadata carry modelspec.prediction_type."""
        if ARCHITECTURE_KEY in metadata:
            kind = json.loads(metadata[ARCHITECTURE_KEY]).get("scheduler", {}).get("prediction_type")
            if kind:
                return kind, "the checkpoint's embedded scheduler config says so"
        spec = metadata.get("modelspec.prediction_type")
        if spec:
            return {"v": "v_prediction"}.get(spec, spec), "the checkpoint's modelspec.prediction_type says so"
        return None, ""

    def stated_prediction_type(self, path: Path, metadata: dict[str, str]) -> str | None:
        """What a base says about its objective without loading it (None: it does not say)."""
        if path.is_dir():
            try:
                kind = json.loads((path / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type")
            except (OSError, ValueError):
                return None
            return kind if kind in PREDICTION_TYPES else None
        return self.file_prediction_type(path, metadata)[0]

    def resolution_for(self, prediction_type: str | None) -> int:
        """The side the family's models were trained at (SD2: 768 for 768-v models)."""
        return self.default_resolution

    def resolve_prediction_type(self, settings: LoadSettings, said: tuple[str | None, str], path: Path) -> tuple[str, str]:
        if settings.prediction_type != "auto":
            return settings.prediction_type, f"prediction_type: {settings.prediction_type} in the config"
        kind, why = said
        if kind in PREDICTION_TYPES:
            return kind, why
        if settings.weights_only:
            return "epsilon", "not stated by the file; only the weights are used here"
        return self.unknown_prediction_type(path)

    def unknown_prediction_type(self, path: Path) -> tuple[str, str]:
        raise NotImplementedError

    def _pipeline_extras(self) -> dict[str, Any]:
        """Constructor arguments of the pipeline class beyond the components (no safety checker)."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _load_single_file(self, path: Path, configs: dict[str, dict[str, Any]], dtype: torch.dtype | None = None):
        with tempfile.TemporaryDirectory() as tmp:
            self._write_config_folder(Path(tmp), configs)
            # diffusers logs every skipped EMA/optimizer key at WARNING; those are expected in pruned checkpoints.
            logging.getLogger("diffusers").setLevel(logging.ERROR)
            try:
                pipe = self.pipeline_class.from_single_file(str(path), config=tmp, local_files_only=True,
                                                            torch_dtype=dtype, **self._pipeline_extras())
            except Exception as exc:
                raise ModelLoadError(f"diffusers could not load {path} as {self.label}: {exc}") from exc
        self._check_no_meta(pipe, path)
        return pipe

    def _write_config_folder(self, folder: Path, configs: dict[str, dict[str, Any]]) -> None:
        (folder / "model_index.json").write_text(json.dumps(self.model_index))
        for name, cfg in ((c, configs[c]) for c in self.config_files):
            sub = folder / name
            sub.mkdir()
            filename = "scheduler_config.json" if name == "scheduler" else "config.json"
            (sub / filename).write_text(json.dumps(cfg))
        self.write_tokenizers(folder)

    def write_tokenizers(self, folder: Path) -> dict[str, Path]:
        """Each text encoder's tokenizer files (built in code: nothing from a hub), as a diffusers folder has them."""
        return {folder_name: write_clip_tokenizer_files(folder / folder_name, pad_token=self.pad_for(encoder))
                for encoder, folder_name in self.tokenizer_folders.items()}

    def pad_for(self, encoder: str) -> str:
        return self.pad_token

    def _check_no_meta(self, pipe, path: Path) -> None:
        # from_single_file leaves parameters missing from the file on the meta device instead of failing.
        for name in (self.denoiser, self.autoencoder) + self.text_encoders:
            missing = [n for n, p in getattr(pipe, name).named_parameters() if p.device.type == "meta"]
            if missing:
                raise ModelLoadError(
                    f"{path} lacks {len(missing)} {name} weights (first: {missing[0]}); the checkpoint is incomplete "
                    "or from a different architecture."
                )

    # --- conditioning and prediction ------------------------------------------------------------------------
    def tokenize(self, tokenizers: dict[str, Any], captions: list[str], chunks: int = 1) -> dict[str, Tensor]:
        """chunks > 1: max_token_length 75 x chunks, as (batch, chunks, 77) windows (long_prompts.py)."""
        return {"input_ids": clip_ids(tokenizers["tokenizer"], captions, chunks)}

    def encode(self, text_encoders: dict[str, nn.Module], tokens: dict[str, Tensor], device) -> Conditioning:
        """The text encoder's last hidden states (SD2's 23-layer encoder already ends at OpenCLIP's
        penultimate layer, which is what SD2 was trained on); windows of a long caption joined."""
        ids = tokens["input_ids"]
        if ids.dim() == 2:
            return Conditioning(text_encoders["text_encoder"](ids.to(device))[0])
        hidden = text_encoders["text_encoder"](ids.flatten(0, 1).to(device))[0]
        return Conditioning(join_windows(hidden, ids.shape[0]))

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                placement: Tensor | None = None) -> Tensor:
        """placement: (batch, 6) where each crop came from (data.images.Placement.ids); SD1/SD2 ignore it."""
        return denoiser(noisy, timesteps, cond.hidden).sample

    def latents(self, vae: nn.Module, sample: Tensor) -> Tensor:
        """VAE latent-distribution sample (or mean) -> what the denoiser is trained on."""
        return sample * vae.config.scaling_factor

    # --- LoRA targets and names -----------------------------------------------------------------------------
    def target_modules(self, component: str, module: nn.Module, targets: str | list[str]) -> list[str]:
        if component == "unet":
            return _unet_targets(module, targets)
        return _text_encoder_targets(module, targets)

    def conv_targets(self, component: str, module: nn.Module) -> tuple[list[str], list[str]]:
        """kohya's conv_dim: every layer inside the UNet's ResNet blocks and down/up-samplers, as sd-scripts'
        networks/lora.py adds them: (its Linear and 1x1 layers, which take the main rank; its 3x3 convolutions,
        which take conv_rank). Text encoders have none."""
        if component != self.denoiser:
            return [], []
        scopes = [n for n, m in module.named_modules() if type(m).__name__ in _CONV_SCOPES]
        inside = [(n, m) for n, m in module.named_modules() if any(n.startswith(s + ".") for s in scopes)]
        return (sorted(n for n, m in inside if _is_linear_or_1x1(m)),
                sorted(n for n, m in inside if isinstance(m, nn.Conv2d) and not _is_linear_or_1x1(m)))

    def offload_units(self, denoiser: nn.Module) -> list[nn.Module]:
        """ResNet blocks and transformer layers: diffusers' UNet checkpoints each of them on its own (a
        Transformer2DModel checkpoints its layers, not itself); all but the mid block's first ResNet, which
        UNetMidBlock2DCrossAttn runs outside checkpointing (autograd would keep its weights, swapped out)."""
        mid = getattr(getattr(denoiser, "mid_block", None), "resnets", None)
        kept = {id(mid[0])} if mid else set()
        return [m for m in denoiser.modules()
                if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock") and id(m) not in kept]

    def idle_modules(self, component: str, module: nn.Module, targets: list[str]) -> list[str]:
        """Targeted modules whose output never reaches the loss (none for SD1/SD2)."""
        return []

    def target_layers(self, component: str, module: nn.Module) -> list[str]:
        """Every layer a module-name list may name (for checking such a list)."""
        kind = _is_linear_or_1x1 if component == "unet" else (lambda m: isinstance(m, nn.Linear))
        return [n for n, m in module.named_modules() if kind(m)]

    target_hint = TARGET_HINT

    def target_problems(self, component: str, modules: list[str]) -> list[str]:
        """Target sets that some loader would not apply in full (none for SD1)."""
        return []

    def kohya_name(self, component: str, module_path: str) -> str:
        return kohya_module_name(component, module_path)

    vae_scale_factor = 8  # pixels per latent cell

    text_encoder_classes = {"text_encoder": "CLIPTextModel"}  # transformers class of each text encoder
    # Tiny test/demo sizes (families/tiny.py): the same classes and key layout as the real model, ~2 M parameters.
    # Widths are multiples of 32 because LDM configs hard-code 32 GroupNorm groups.
    tiny_sizes = {
        "unet": dict(block_out_channels=[32, 64], layers_per_block=2, sample_size=32, cross_attention_dim=32,
                     attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=32),
        "vae": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
                    sample_size=64, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
                             pad_token_id=49407),
    }

    def build_modules(self, configs: dict[str, dict[str, Any]]) -> dict[str, nn.Module]:
        """The networks these configs describe, freshly initialised (on the current default device: "meta" for
        a size-only model); the VAE only where its config is given."""
        import transformers
        from diffusers import AutoencoderKL, UNet2DConditionModel

        # In this order (denoiser, VAE, text encoders): a seeded tiny model keeps its weights across versions.
        out = {self.denoiser: UNet2DConditionModel.from_config(configs[self.denoiser])}
        if self.autoencoder in configs:
            out[self.autoencoder] = AutoencoderKL.from_config(configs[self.autoencoder])
        for name, cls in self.text_encoder_classes.items():
            te_cfg = {k: v for k, v in configs[name].items() if k != "architectures"}
            out[name] = getattr(transformers, cls)(transformers.CLIPTextConfig(**te_cfg))
        return out

    def meta_modules(self, configs: dict[str, dict[str, Any]], dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
        """The networks at their real size without memory (memory estimate, name tables); the VAE only where its
        config is given (and then in fp32: dtype is for the denoiser and text encoders)."""
        with torch.device("meta"):
            out = self.build_modules(configs)
        if dtype is not None:
            for name in (self.denoiser,) + self.text_encoders:
                out[name].to(dtype)
        return out

    def latent_channels(self, configs: dict[str, dict[str, Any]]) -> int:
        return configs["unet"].get("in_channels", 4)

    def blank_tokens(self, batch: int, device) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(batch, 77, dtype=torch.long, device=device)}

    def blank_conditioning(self, configs: dict[str, dict[str, Any]], batch: int, dtype, device) -> Conditioning:
        return Conditioning(torch.empty(batch, 77, configs["unet"]["cross_attention_dim"], dtype=dtype, device=device))

    def module_table(self, configs: dict[str, dict[str, Any]]) -> dict[str, ModuleEntry]:
        """kohya name -> ModuleEntry for every layer a LoRA can target, from the configs alone (meta device)."""
        modules = self.meta_modules({k: v for k, v in configs.items() if k != self.autoencoder})
        unet = modules["unet"]
        lpb = unet.config.layers_per_block
        up_attn = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
        table: dict[str, ModuleEntry] = {}
        for path, m in unet.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                ldm = UNET_PREFIX + _unet_key(f"{path}.weight", lpb, up_attn, self.text_time)
                table[self.kohya_name("unet", path)] = ModuleEntry("unet", path, ldm, tuple(m.weight.shape))
        for component in self.text_encoders:
            for path, m in modules[component].named_modules():
                if isinstance(m, nn.Linear) and path != "text_projection":
                    entry = self.text_encoder_entry(component, path, tuple(m.weight.shape))
                    table[self.kohya_name(component, path)] = entry
        return table

    def text_encoder_entry(self, component: str, path: str, shape: tuple[int, ...]) -> ModuleEntry:
        raise NotImplementedError

    def ldm_alias(self, kohya_name: str, table: dict[str, ModuleEntry]) -> str | None:
        """ComfyUI also accepts UNet names in the LDM layout (lora_unet_input_blocks_1_1_proj_in); its kohya name."""
        if not kohya_name.startswith(KOHYA_UNET):
            return None
        by_ldm = {unet_name_from_ldm(e.ldm_key): name for name, e in table.items() if e.component == "unet"}
        return by_ldm.get(kohya_name)

    # --- single files ---------------------------------------------------------------------------------------
    def text_encoder_to_ldm(self, state: dict[str, Any], component: str = "text_encoder") -> dict[str, Any]:
        raise NotImplementedError

    def ldm_state_dict(self, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
        """The components in the original single-file layout A1111 and ComfyUI read."""
        unet = modules["unet"]
        state = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, self.text_time)
        state.update(vae_to_ldm(modules["vae"].state_dict()))
        for name in self.text_encoders:
            state.update(self.text_encoder_to_ldm(modules[name].state_dict(), name))
        return state

    def folder_shapes_to_ldm(self, configs: dict[str, Any], shapes: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
        """A diffusers folder's UNet and text-encoder key shapes renamed to the single-file layout (renaming
        only, so shapes stand in for tensors)."""
        out = unet_to_ldm(shapes["unet"], configs["unet"]["layers_per_block"], self.text_time)
        for name in self.text_encoders:
            out.update(self.text_encoder_shapes_to_ldm(shapes[name], name))
        return out

    def text_encoder_shapes_to_ldm(self, shapes: dict[str, tuple[int, ...]], component: str = "text_encoder"
                                   ) -> dict[str, tuple[int, ...]]:
        return self.text_encoder_to_ldm(shapes, component)

    # --- generation -----------------------------------------------------------------------------------------
    def pipeline(self, model: Model, scheduler, modules: dict[str, nn.Module] | None = None):
        """modules: stand-ins for the model's own (the trainer passes its unwrapped, LoRA-carrying networks)."""
        pipe = self.pipeline_from_parts({**model.modules, **(modules or {})}, model.tokenizers, scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_from_parts(self, modules: dict[str, nn.Module], tokenizers: dict[str, Any], scheduler):
        """The family's diffusers pipeline around these networks and tokenizers."""
        return self.pipeline_class(**modules, **tokenizers, scheduler=scheduler, **self._pipeline_extras())

    def load_controlnet(self, path: Path, model: Model) -> nn.Module:
        from .controlnet import load_controlnet

        return load_controlnet(path, model.denoiser, self.label)

    def attach_ip_adapter(self, pipe, path: Path, encoder: Path, model: Model) -> None:
        from .ip_adapter import attach_ip_adapter

        attach_ip_adapter(pipe, path, encoder, model.denoiser, self.label)

    def control_pipeline(self, pipe, controlnets: list[nn.Module]):
        # The pipeline's own options (SDXL: no watermark) are not components: from_pipe would take the defaults.
        extras = {k: v for k, v in self._pipeline_extras().items() if k not in pipe.components}
        out = self.control_pipeline_class.from_pipe(pipe, controlnet=list(controlnets), **extras)
        out.set_progress_bar_config(disable=True)
        return out

    # --- what a LoRA file says about its base ---------------------------------------------------------------
    def lora_metadata(self, prediction_type: str, variant: str = "") -> dict[str, str]:
        """How sd-scripts files a LoRA of this family (A1111 lists it under matching models by these)."""
        return {"ss_base_model_version": self.base_model_version, "ss_v2": str(self.v2),
                "modelspec.architecture": self.modelspec_architecture}


def _unet_targets(unet: nn.Module, targets: str | list[str]) -> list[str]:
    """Full module names. `kohya` = every Linear and 1x1 Conv inside each Transformer2DModel, which is what
    sd-scripts' networks/lora.py targets for SD1.x/SD2.x (16 transformers x 12 = 192 modules in SD1.5)."""
    scopes = [name for name, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
    inside = [(n, m) for n, m in unet.named_modules() if any(n.startswith(s + ".") for s in scopes)]
    if targets == "kohya":
        names = [n for n, m in inside if _is_linear_or_1x1(m)]
    else:
        suffixes = _UNET_SUFFIXES[targets] if isinstance(targets, str) else tuple(targets)
        pool = inside if isinstance(targets, str) else list(unet.named_modules())
        names = [n for n, m in pool if _is_linear_or_1x1(m) and any(n == s or n.endswith("." + s) for s in suffixes)]
    return sorted(names)


def _text_encoder_targets(text_encoder: nn.Module, targets: str | list[str]) -> list[str]:
    """`kohya` = the 6 Linears of each CLIP layer (q/k/v/out_proj, fc1, fc2): 72 modules for CLIP-L."""
    suffixes = _TE_PRESETS[targets] if isinstance(targets, str) else tuple(targets)
    return sorted(
        n for n, m in text_encoder.named_modules()
        if ".layers." in f".{n}" and isinstance(m, nn.Linear) and any(n.endswith("." + s) for s in suffixes)
    )


def clip_ids(tokenizer, captions: list[str], chunks: int = 1) -> Tensor:
    """(batch, 77) ids, or (batch, chunks, 77) windows for captions up to 75 x chunks tokens."""
    if chunks > 1:
        return chunked_ids(tokenizer, captions, chunks)
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def open_clip_attention_problems(label: str, modules: list[str]) -> list[str]:
    """A1111 applies an OpenCLIP layer's attention LoRA only when q, k, v and out_proj are all there (it
    patches the fused nn.MultiheadAttention as one); a subset would be silently dropped in A1111."""
    layers: dict[str, set[str]] = {}
    for m in modules:
        head, _, last = m.rpartition(".")
        if last in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layers.setdefault(head, set()).add(last)
    partial = sorted(h for h, got in layers.items() if len(got) < 4)
    if not partial:
        return []
    return [f"lora_targets: {partial[0]} gets LoRA on {', '.join(sorted(layers[partial[0]]))} only; for "
            f"{label} OpenCLIP text encoders A1111 applies attention LoRA only when q_proj, k_proj, v_proj and "
            "out_proj are all targeted. Use the kohya or attn preset, or list all four"]


def clip_ldm_entry(path: str, shape: tuple[int, ...], component: str = "text_encoder",
                   prefix: str = CLIP_PREFIX) -> ModuleEntry:
    return ModuleEntry(component, path, f"{prefix}{with_text_model(path)}.weight", shape)


def open_clip_entry(path: str, shape: tuple[int, ...], component: str = "text_encoder",
                    prefix: str = OPEN_CLIP_PREFIX) -> ModuleEntry:
    """An OpenCLIP tower's layer (SD2's, SDXL's bigG): its weight, or its rows of the fused q/k/v in_proj."""
    key, index = open_clip_weight_of(path, prefix)
    if index is None:
        return ModuleEntry(component, path, key, shape)
    rows = (index * shape[0], (index + 1) * shape[0])
    return ModuleEntry(component, path, key, shape, rows, (3 * shape[0],) + tuple(shape[1:]))


__all__ = ["ARCHITECTURE_KEY", "SDModel", "StableDiffusionFamily", "clip_to_ldm", "clip_ldm_entry", "open_clip_entry",
           "open_clip_attention_problems"]
