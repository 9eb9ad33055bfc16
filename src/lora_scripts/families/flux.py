"""Flux.1 (dev, schnell and fine-tunes of their architecture): the first DiT / flow-matching family.

What it is, as far as training a LoRA goes:
* a 12 B-parameter transformer (FluxTransformer2DModel): 19 double-stream blocks (image and text tokens
  with their own weights, joint attention) and 38 single-stream blocks; 16-channel latents packed 2x2 into
  64-wide tokens, with 3-axis rotary position ids for image and text tokens;
* conditioning: T5-XXL's last hidden states (up to 512 tokens for dev, 256 for schnell) as the text tokens,
  and CLIP-L's pooled output beside the timestep; dev is guidance-distilled and takes the guidance value as
  an input (`guidance_in`), schnell has no such input;
* objective: rectified flow (flow_matching.py); the timestep the transformer sees is the noise level sigma;
* files: ComfyUI users keep four (the transformer in BFL layout, clip_l, t5xxl, ae) or one all-in-one
  checkpoint holding them all; diffusers users a folder. LoRA modules are named by the BFL layout (formats/flux.py), whose fused q/k/v Linears hold
  several diffusers layers each: the export fuses their LoRAs exactly (formats/fused.py).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn

from ..errors import ConfigError, ModelLoadError
from ..formats import flux as bfl
from ..formats.kohya import text_encoder_name
from ..formats.ldm import with_text_model
from .base import CaptionLimit, Conditioning, Family, LoadSettings, Model, ModuleEntry
from .clip_tokenizer import write_clip_tokenizer_files
from .flow_matching import FlowMatchingObjective
from .flux_files import (EMBEDDED, _NOT_TRANSFORMER, _assign, _dequantize_scaled_fp8, _read_state,
                         _text_model_from_file, _under, embedded_parts)
from .stable_diffusion import ARCHITECTURE_KEY, _text_encoder_targets, clip_ids
from .t5_tokenizer import build_tiny_t5_tokenizer, find_t5_tokenizer, load_t5_tokenizer

log = logging.getLogger(__name__)

MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"  # only Flux.1's transformer has it
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # dev (guidance-distilled) has it, schnell does not
IMG_IN_KEY = "img_in.weight"  # its input width: 64 text-to-image, 384 Fill, 128 Depth/Canny
FILE_KINDS = {"clip_l": "CLIP-L text encoder (clip_l.safetensors)",
              "t5xxl": "T5-XXL text encoder (t5xxl_fp16.safetensors or an fp8 one)",
              "ae": "Flux autoencoder (ae.safetensors)"}
_CLIP_MARKER = "encoder.layers.0.self_attn.q_proj.weight"
_T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
_AE_MARKER = "encoder.conv_out.weight"
_KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}  # sd-scripts: CLIP-L te1, T5 te3

_DOUBLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")
_PRESETS = {"attn": _DOUBLE_ATTN + ("attn.to_q", "attn.to_k", "attn.to_v"), "qv": ("attn.to_q", "attn.to_v")}
_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
TARGET_HINT = ("Flux transformer layer names end in attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, "
               "attn.to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.2, norm1.linear, proj_mlp, proj_out, "
               "norm.linear (double blocks are transformer_blocks.N, single ones single_transformer_blocks.N); "
               "CLIP-L ones in q_proj, k_proj, v_proj, out_proj, fc1, fc2. Or use a preset: kohya, attn, qv")

_MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


class Flux(Family):
    name = "flux1"
    label = "Flux.1"
    lora_label = "flux1"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    denoiser_label = "transformer"
    default_resolution = 1024
    config_package = "lora_scripts.families.configs.flux1"
    config_files = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")
    tokenizer_folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    model_index = _MODEL_INDEX
    pipeline_class = FluxPipeline
    vae_scale_factor = 8
    target_hint = TARGET_HINT
    text_encoder_classes = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    # sd-scripts files Flux LoRAs as "flux1" and modelspec "flux-1-dev/lora" (schnell: flux-1-schnell).
    base_model_version = "flux1"
    # Tiny test sizes: the real block kinds and layouts (two of each block), unequal text widths (CLIP 32, T5 48)
    # so a swapped encoder fails loudly; rotary axes summing to the head width as Flux's (16+56+56 = 128).
    tiny_sizes = {
        "transformer": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                            joint_attention_dim=48, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
        "vae": dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=32),
        "text_encoder_2": dict(d_model=48, d_ff=64, d_kv=12, num_heads=4, num_layers=2, num_decoder_layers=2,
                               vocab_size=128),
    }

    # --- recognising ----------------------------------------------------------------------------------------
    def recognise(self, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> bool:
        return MARKER in shapes or bfl.BFL_PREFIX + MARKER in shapes

    def recognise_folder(self, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> bool:
        return index.get("_class_name") == "FluxPipeline" and self.recognise_configs(configs)

    def recognise_configs(self, configs: dict[str, dict[str, Any]]) -> bool:
        return configs.get("transformer", {}).get("_class_name") == "FluxTransformer2DModel"

    def trainable(self, train_text_encoder: bool) -> tuple[str, ...]:
        """T5-XXL never takes LoRA here (as in sd-scripts by default and ai-toolkit): 4.7 B parameters to
        backpropagate through for a small gain; CLIP-L does with train_text_encoder."""
        return (self.denoiser,) + (("text_encoder",) if train_text_encoder else ())

    # --- loading --------------------------------------------------------------------------------------------
    def load(self, path: Path, metadata: dict[str, str], settings: LoadSettings) -> Model:
        if settings.prediction_type != "auto" or settings.zero_terminal_snr:
            raise ConfigError("the config", [
                f"prediction_type / zero_terminal_snr describe DDPM models (SD1, SD2, SDXL); {self.label} is trained "
                "with flow matching: remove them (timestep_sampling and loss_weighting are its options)"])
        if path.is_dir():
            modules, tokenizers, configs = self._load_folder(path, settings)
        else:
            modules, tokenizers, configs = self._load_files(path, metadata, settings)
        schedule = FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"])
        objective = FlowMatchingObjective(settings.timestep_sampling, settings.sigmoid_scale,
                                          settings.discrete_flow_shift, settings.loss_weighting)
        model = Model(self, path, modules, tokenizers, schedule, objective,
                      f"{self.label} is trained with rectified flow (velocity = noise - image)")
        model.variant = "dev" if modules["transformer"].config.guidance_embeds else "schnell"
        model.predict_options = self.predict_options({"transformer": dict(modules["transformer"].config)}, settings)
        return model

    def sample_defaults(self, variant: str = "") -> dict[str, Any]:
        """As BFL and ComfyUI draw them: dev 28 steps at distilled guidance 3.5; schnell 4 steps, no guidance."""
        return {"steps": 4, "cfg": 0.0} if variant == "schnell" else {"steps": 28, "cfg": 3.5}

    def predict_options(self, configs: dict[str, dict[str, Any]], settings: LoadSettings) -> dict[str, Any]:
        return {"guidance": settings.guidance_scale if configs["transformer"].get("guidance_embeds") else None}

    def file_configs(self, path: Path, metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
        """A transformer file's configs: its own (our test files), else the embedded Flux.1-dev ones, with
        guidance_embeds as the weights say (schnell has no guidance_in)."""
        from .loading import read_checkpoint_info

        if ARCHITECTURE_KEY in metadata:
            return json.loads(metadata[ARCHITECTURE_KEY])
        configs = self.embedded_configs()
        shapes = read_checkpoint_info(path).shapes
        guided = GUIDANCE_KEY in shapes or bfl.BFL_PREFIX + GUIDANCE_KEY in shapes
        configs["transformer"] = {**configs["transformer"], "guidance_embeds": guided}
        return configs

    def training_metadata(self, config) -> dict[str, Any]:
        """As sd-scripts' flux_train_network records its options (its network module is networks.lora_flux; a
        LyCORIS type keeps lycoris.kohya, as LyCORIS' wrapper writes it for Flux too)."""
        lycoris = config.network_type in ("loha", "lokr", "dora")
        return {"ss_network_module": "lycoris.kohya" if lycoris else "networks.lora_flux",
                "ss_guidance_scale": config.guidance_scale,
                "ss_timestep_sampling": config.timestep_sampling, "ss_sigmoid_scale": config.sigmoid_scale,
                "ss_discrete_flow_shift": config.discrete_flow_shift, "ss_weighting_scheme": config.loss_weighting,
                "ss_model_prediction_type": "raw", "ss_apply_t5_attn_mask": False,
                "ss_max_sequence_length": config.max_sequence_length}

    def _load_folder(self, folder: Path, settings: LoadSettings):
        try:
            pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True, torch_dtype=settings.dtype)
        except Exception as exc:
            raise ModelLoadError(f"diffusers could not load {folder} as {self.label}: {exc}") from exc
        modules = {n: getattr(pipe, n) for n in (self.denoiser, self.autoencoder) + self.text_encoders}
        tokenizers = {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}
        if settings.tokenizer_dir is not None:
            tokenizers["tokenizer_2"] = load_t5_tokenizer(find_t5_tokenizer(settings.tokenizer_dir, folder, []),
                                                          self.t5_length(settings, modules["transformer"]))
        tokenizers["tokenizer_2"].model_max_length = self.t5_length(settings, modules["transformer"])
        configs = {"scheduler": dict(pipe.scheduler.config)}
        return modules, tokenizers, configs

    def _load_files(self, path: Path, metadata: dict[str, str], settings: LoadSettings):
        from .loading import read_checkpoint_info

        files = {k: Path(v) for k, v in settings.files.items()}
        base_header = read_checkpoint_info(path).shapes
        # Parts the base file holds itself (an all-in-one checkpoint); a file the config names takes precedence.
        inside = {k: prefix for k, prefix in embedded_parts(base_header).items() if k not in files}
        missing = [k for k in FILE_KINDS if k not in files and k not in inside]
        if missing:
            raise ConfigError("the config", [
                f"{k}: required with a Flux transformer file as base_model ({path.name}): the {FILE_KINDS[k]}. "
                "Or set base_model to a Flux diffusers folder" for k in missing])
        headers = {k: read_checkpoint_info(f).shapes for k, f in files.items()}
        headers.update({k: _under(base_header, prefix) for k, prefix in inside.items()})
        self._check_kinds({**files, **{k: f"{path} ({prefix}*)" for k, prefix in inside.items()}}, headers)
        sources = {**{k: (f, "") for k, f in files.items()}, **{k: (path, prefix) for k, prefix in inside.items()}}
        configs = self.file_configs(path, metadata)
        dtype = settings.dtype
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        transformer = self._transformer_from_file(path, configs["transformer"], dtype)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vae").mkdir()
            (Path(tmp) / "vae" / "config.json").write_text(json.dumps(configs["vae"]))
            try:
                vae = AutoencoderKL.from_single_file(_read_state(*sources["ae"]), config=tmp, subfolder="vae",
                                                     local_files_only=True, torch_dtype=dtype)
            except Exception as exc:
                raise ModelLoadError(f"diffusers could not load {sources['ae'][0]} as the Flux autoencoder: {exc}") from exc
            clip_folder = write_clip_tokenizer_files(Path(tmp) / "tokenizer")
            from transformers import CLIPTokenizer

            clip_tok = CLIPTokenizer.from_pretrained(str(clip_folder), local_files_only=True)
        modules = {"transformer": transformer, "vae": vae,
                   "text_encoder": _text_model_from_file(sources["clip_l"], "CLIPTextModel", configs["text_encoder"],
                                                         dtype, with_text_model),
                   "text_encoder_2": _text_model_from_file(sources["t5xxl"], "T5EncoderModel", configs["text_encoder_2"],
                                                           dtype, None)}
        try:
            t5_tok = load_t5_tokenizer(find_t5_tokenizer(settings.tokenizer_dir, None, [path, *files.values()]),
                                       self.t5_length(settings, transformer))
        except ModelLoadError:
            if not settings.weights_only:
                raise
            # Only the weights are used (verify, bake): a stand-in makes the pipeline; nothing is tokenized.
            t5_tok = build_tiny_t5_tokenizer()
        tokenizers = {"tokenizer": clip_tok, "tokenizer_2": t5_tok}
        return modules, tokenizers, configs

    def companion_files(self, path: Path) -> dict[str, Path | None]:
        """The other files of a transformer file, where users keep them: beside it, or in a ComfyUI models/
        tree (text_encoders/ or clip/, vae/). The 16-bit T5 is preferred to an fp8 one. None: not found."""
        from .loading import read_checkpoint_info

        if path.is_dir():
            return {}
        try:
            inside = embedded_parts(read_checkpoint_info(path).shapes)  # an all-in-one file needs none of them
        except ModelLoadError:
            inside = {}
        places = [path.parent]
        models = next((p for p in path.resolve().parents if p.name == "models"), None)
        if models is not None:
            places += [models / d for d in ("text_encoders", "clip", "vae")]
        found: dict[str, Path | None] = {}
        for key, patterns in (("clip_l", ("clip_l*.safetensors",)), ("t5xxl", ("t5xxl_fp16*.safetensors", "t5xxl*.safetensors")),
                              ("ae", ("ae.safetensors", "flux*ae*.safetensors", "flux*vae*.safetensors"))):
            if key not in inside:
                found[key] = next((f for pattern in patterns for place in places for f in sorted(place.glob(pattern))), None)
        return found

    def lora_block(self, kohya_name: str) -> str | None:
        """The transformer's blocks by kind (double / single), as `inspect` counts them."""
        if m := re.match(r"lora_unet_(double|single)_blocks_\d+", kohya_name):
            return f"transformer.{m[1]}_blocks"
        return None

    def file_kind(self, shapes: dict[str, tuple[int, ...]]) -> tuple[str | None, str]:
        """(the config key a separate file fits — clip_l, t5xxl, ae — or None, what it is in words)."""
        keys = set(shapes)
        if any(k.endswith(_CLIP_MARKER) for k in keys):
            q = next(v for k, v in shapes.items() if k.endswith(_CLIP_MARKER))
            layers = {k.split("encoder.layers.")[1].split(".")[0] for k in keys if "encoder.layers." in k}
            if q[0] > 768 or len(layers) > 12:
                return None, f"a CLIP text encoder {q[0]} wide with {len(layers)} layers (CLIP-G, SDXL/SD3's)"
            return "clip_l", "a CLIP text encoder"
        if any(k.endswith(_T5_MARKER) for k in keys):
            return "t5xxl", "a T5 text encoder"
        if any(k.endswith(_AE_MARKER) for k in keys) and any(k.startswith("decoder.") for k in keys):
            conv_out = next(v for k, v in shapes.items() if k.endswith(_AE_MARKER))
            if conv_out[0] != 32:  # 2 x 16 latent channels (mean and log-variance)
                return None, f"an autoencoder with {conv_out[0] // 2} latent channels (an SD1/SDXL VAE?)"
            return "ae", "an autoencoder"
        if self.recognise(shapes, {}):
            return None, "a Flux transformer"
        return None, f"not a model component ({len(keys)} keys)"

    def _check_kinds(self, files: dict[str, Path], headers: dict[str, dict[str, tuple[int, ...]]]) -> None:
        """Each separate file must be what its key says: a clear error for a swapped or foreign file."""
        problems = []
        for kind, shapes in headers.items():
            fits, found = self.file_kind(shapes)
            if fits != kind:
                problems.append(f"{kind} = {str(files[kind])!r}: this is {found}, not the {FILE_KINDS[kind]}")
        if problems:
            raise ConfigError("the config", problems)

    def _transformer_from_file(self, path: Path, config: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
        """Built on the meta device and filled from the file (BFL layout, any prefix, bf16/fp16/fp8 weights cast
        to dtype): one copy of the weights in memory, never an fp32 one first."""
        with init_empty_weights(include_buffers=False):
            model = FluxTransformer2DModel.from_config(config)
        state = _read_state(path, "", lambda k: not k.startswith(_NOT_TRANSFORMER))
        state = {k.removeprefix(bfl.BFL_PREFIX): v for k, v in state.items()}
        state = _dequantize_scaled_fp8(state)
        width = config["num_attention_heads"] * config["attention_head_dim"]
        try:
            converted = bfl.bfl_to_transformer(state, width)
        except (bfl.FluxLayoutError, RuntimeError) as exc:
            raise ModelLoadError(f"{path} is not a complete Flux.1 transformer: {exc}") from exc
        del state
        target = dtype or torch.float32
        _assign(model, {k: v.to(target) for k, v in converted.items()}, path)
        return model

    def pipeline_options(self, model, settings: LoadSettings) -> dict[str, Any]:
        """FluxPipeline pads prompts to 512 T5 tokens unless told: training's length instead (schnell 256, or the
        config's max_sequence_length), so previews and images see the padding the LoRA was trained with."""
        return {"max_sequence_length": self.t5_length(settings, model.denoiser)}

    def t5_length(self, settings: LoadSettings, transformer: nn.Module | None = None, guided: bool = True) -> int:
        """T5 tokens per caption: the config's max_sequence_length, else what the pipeline uses (dev 512,
        schnell 256: schnell was distilled at 256). guided: dev, where no transformer is loaded."""
        if settings.max_sequence_length:
            return settings.max_sequence_length
        return 512 if (transformer.config.guidance_embeds if transformer is not None else guided) else 256

    def caption_limit(self, path: Path | None, settings: LoadSettings, max_token_length: int) -> CaptionLimit | None:
        """T5's tokens (CLIP-L gives only its pooled output, truncated at 77 as FluxPipeline does): the sequence
        length less its end token. None without a T5 tokenizer: training then names where to get one."""
        from .loading import read_checkpoint_info

        if path is None or not path.exists():
            return None
        folder = path if path.is_dir() else None
        try:
            found = find_t5_tokenizer(settings.tokenizer_dir, folder, [path, *settings.files.values()])
            if folder is not None:
                guided = json.loads((folder / "transformer" / "config.json").read_text()).get("guidance_embeds", True)
            else:
                guided = self.file_configs(path, read_checkpoint_info(path).metadata)["transformer"]["guidance_embeds"]
        except (ModelLoadError, OSError, ValueError, KeyError):
            return None
        length = self.t5_length(settings, guided=guided)
        more = "set max_sequence_length: 512 to read up to 511 tokens" if length < 512 else ""
        return CaptionLimit(load_t5_tokenizer(found, length), length - 1, "T5", more)

    # --- conditioning and prediction ------------------------------------------------------------------------
    def tokenize(self, tokenizers: dict[str, Any], captions: list[str], chunks: int = 1) -> dict[str, Tensor]:
        """CLIP-L ids (77, only its pooled output is used, so long captions need no windows) and T5 ids padded
        to the tokenizer's length (max_sequence_length), as FluxPipeline.encode_prompt makes them."""
        t5 = tokenizers["tokenizer_2"]
        ids = t5(captions, padding="max_length", max_length=t5.model_max_length, truncation=True,
                 return_tensors="pt").input_ids
        return {"input_ids": clip_ids(tokenizers["tokenizer"], captions), "t5_ids": ids}

    def encode(self, text_encoders: dict[str, nn.Module], tokens: dict[str, Tensor], device) -> Conditioning:
        """T5's last hidden states (the text tokens) and CLIP-L's pooled output, as FluxPipeline computes them."""
        pooled = text_encoders["text_encoder"](tokens["input_ids"].to(device), output_hidden_states=False).pooler_output
        hidden = text_encoders["text_encoder_2"](tokens["t5_ids"].to(device), output_hidden_states=False)[0]
        return Conditioning(hidden, {"pooled": pooled})

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                placement: Tensor | None = None, guidance: float | None = None) -> Tensor:
        """noisy: (batch, 16, h, w) latents; packed into 2x2 tokens with their position ids, as FluxPipeline does,
        and the velocity unpacked to the same shape. timesteps: sigmas in [0, 1]."""
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond.hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        g = None if guidance is None else torch.full((b,), float(guidance), device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=packed, timestep=timesteps.to(noisy.device, noisy.dtype), guidance=g,
                       pooled_projections=cond.extras["pooled"], encoder_hidden_states=cond.hidden, txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def latents(self, vae: nn.Module, sample: Tensor) -> Tensor:
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    # --- LoRA targets and names -----------------------------------------------------------------------------
    def target_layers(self, component: str, module: nn.Module) -> list[str]:
        if component == self.denoiser:
            return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and _has_bfl_name(n)]
        return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]

    def target_modules(self, component: str, module: nn.Module, targets: str | list[str]) -> list[str]:
        """kohya = every Linear of the double and single blocks (sd-scripts' default: 19 x 14 + 38 x 6 = 494
        diffusers layers in 380 kohya modules); attn = the attention projections; qv = q and v."""
        if component != self.denoiser:
            return _text_encoder_targets(module, targets)
        layers = self.target_layers(component, module)
        in_blocks = [n for n in layers if n.startswith(_BLOCKS)]
        if targets == "kohya":
            return sorted(in_blocks)
        suffixes, pool = (_PRESETS[targets], in_blocks) if isinstance(targets, str) else (tuple(targets), layers)
        return sorted(n for n in pool if any(n == s or n.endswith("." + s) for s in suffixes))

    def conv_targets(self, component: str, module: nn.Module) -> tuple[list[str], list[str]]:
        return [], []  # a transformer: no convolutions (conv_rank is refused for it in the trainer)

    def unstored_layers(self, component: str) -> tuple[str, ...] | None:
        """The transformer's input embedders, timestep/guidance/pooled-text MLPs and final layer stay in the
        compute dtype (0.5 % of its weights); its adaLN modulation Linears (norm1.linear, norm1_context.linear,
        norm.linear: 3.25 B of 11.9 B weights) are stored like the rest. diffusers' default pattern `norm` would
        keep those in bf16 too, 6.5 GB that fp8/nf4 exist to save; the fp8 Flux.1 files ComfyUI users run, and
        sd-scripts' fp8_base, store them. The text encoders keep diffusers' defaults."""
        if component != self.denoiser:
            return None
        return ("pos_embed", "x_embedder", "context_embedder", "time_text_embed", "norm_out", "^proj_out$")

    def offload_units(self, denoiser: nn.Module) -> list[nn.Module]:
        """The 19 double-stream and 38 single-stream blocks (dev/schnell), each checkpointed on its own."""
        return list(denoiser.transformer_blocks) + list(denoiser.single_transformer_blocks)

    def idle_modules(self, component: str, module: nn.Module, targets: list[str]) -> list[str]:
        return []

    def target_problems(self, component: str, modules: list[str]) -> list[str]:
        return []

    def kohya_name(self, component: str, module_path: str) -> str:
        if component == self.denoiser:
            return bfl.kohya_name(module_path)
        if component == "text_encoder":
            return text_encoder_name(_KOHYA_TE[component], module_path)
        return _KOHYA_TE[component] + module_path.replace(".", "_")

    def fused_slot(self, component: str, module_path: str) -> tuple[int, tuple[int, ...]] | None:
        """(which part, the row ratios of all parts) where this layer is part of a fused kohya module."""
        if component != self.denoiser:
            return None
        module, part = bfl.bfl_module(module_path)
        return None if part is None else (part, bfl.FUSED_RATIOS[module.rsplit(".", 1)[-1]])

    def module_table(self, configs: dict[str, dict[str, Any]]) -> dict[str, ModuleEntry]:
        """kohya name -> ModuleEntry for every layer a LoRA can target; a fused BFL Linear is one entry holding
        its diffusers parts. ldm_key: the transformer file's key (no prefix) or clip_l.safetensors' key."""
        modules = self.meta_modules({k: configs[k] for k in (self.denoiser, "text_encoder")})
        net = modules[self.denoiser]
        table: dict[str, ModuleEntry] = {}
        grouped: dict[str, list[tuple[str, int, nn.Linear]]] = {}
        for path in self.target_layers(self.denoiser, net):
            module, part = bfl.bfl_module(path)
            grouped.setdefault(module, []).append((path, part or 0, net.get_submodule(path)))
        for module, layers in grouped.items():
            layers.sort(key=lambda t: t[1])
            name = bfl.KOHYA_PREFIX + module.replace(".", "_")
            first = layers[0][2].weight
            shape = (sum(m.weight.shape[0] for _, _, m in layers),) + tuple(first.shape[1:])
            parts = tuple((p, m.weight.shape[0]) for p, _, m in layers) if len(layers) > 1 else ()
            table[name] = ModuleEntry(self.denoiser, layers[0][0], f"{module}.weight", shape, parts=parts)
        for path, m in modules["text_encoder"].named_modules():
            if isinstance(m, nn.Linear):
                table[self.kohya_name("text_encoder", path)] = ModuleEntry(
                    "text_encoder", path, f"{with_text_model(path)}.weight", tuple(m.weight.shape))
        return table

    def ldm_alias(self, kohya_name: str, table: dict[str, ModuleEntry]) -> str | None:
        return None

    def base_shapes(self, path: Path, files: dict[str, Path] | None = None) -> dict[str, tuple[int, ...]]:
        """What ComfyUI resolves a LoRA's names against: the transformer file's keys (prefix removed) and, where
        given, clip_l.safetensors' (transformers-4 `text_model.` names)."""
        from .loading import read_checkpoint_info

        header = read_checkpoint_info(path).shapes
        shapes = {k.removeprefix(bfl.BFL_PREFIX): v for k, v in header.items() if not k.startswith(_NOT_TRANSFORMER)}
        if files and "clip_l" in files:
            shapes.update({with_text_model(k): v for k, v in read_checkpoint_info(Path(files["clip_l"])).shapes.items()})
        elif "clip_l" in embedded_parts(header):
            shapes.update({with_text_model(k): v for k, v in _under(header, EMBEDDED["clip_l"]).items()})
        return shapes

    def folder_shapes_to_ldm(self, configs: dict[str, Any], shapes: dict[str, dict[str, tuple[int, ...]]]
                             ) -> dict[str, tuple[int, ...]]:
        out = bfl.transformer_shapes_to_bfl(shapes[self.denoiser])
        out.update({with_text_model(k): v for k, v in shapes["text_encoder"].items()})
        return out

    # --- building (tests, memory estimate, name tables) -----------------------------------------------------
    def build_modules(self, configs: dict[str, dict[str, Any]]) -> dict[str, nn.Module]:
        import transformers

        out = {self.denoiser: FluxTransformer2DModel.from_config(configs[self.denoiser])}
        if self.autoencoder in configs:
            out[self.autoencoder] = AutoencoderKL.from_config(configs[self.autoencoder])
        plain = lambda c: {k: v for k, v in c.items() if k != "architectures"}  # noqa: E731
        if "text_encoder" in configs:
            out["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(**plain(configs["text_encoder"])))
        if "text_encoder_2" in configs:
            out["text_encoder_2"] = transformers.T5EncoderModel(transformers.T5Config(**plain(configs["text_encoder_2"])))
        return out

    def meta_modules(self, configs: dict[str, dict[str, Any]], dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
        with torch.device("meta"):
            out = self.build_modules(configs)
        if dtype is not None:
            for name in (self.denoiser,) + self.text_encoders:
                if name in out:
                    out[name].to(dtype)
        return out

    def latent_channels(self, configs: dict[str, dict[str, Any]]) -> int:
        return configs["vae"]["latent_channels"] if "vae" in configs else configs[self.denoiser]["in_channels"] // 4

    def blank_tokens(self, batch: int, device) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(batch, 77, dtype=torch.long, device=device),
                "t5_ids": torch.zeros(batch, 512, dtype=torch.long, device=device)}

    def blank_conditioning(self, configs: dict[str, dict[str, Any]], batch: int, dtype, device) -> Conditioning:
        cfg = configs[self.denoiser]
        return Conditioning(torch.empty(batch, 512, cfg["joint_attention_dim"], dtype=dtype, device=device),
                            {"pooled": torch.empty(batch, cfg["pooled_projection_dim"], dtype=dtype, device=device)})

    def write_tokenizers(self, folder: Path) -> dict[str, Path]:
        """CLIP-L's tokenizer files (built in code); T5's cannot be built here (see t5_tokenizer.py)."""
        return {"tokenizer": write_clip_tokenizer_files(folder / "tokenizer")}

    def ldm_state_dict(self, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
        """The transformer in the BFL layout of flux1-dev.safetensors (the other components are separate files)."""
        return bfl.transformer_to_bfl(modules[self.denoiser].state_dict())

    # --- generation -----------------------------------------------------------------------------------------
    def pipeline(self, model: Model, scheduler, modules: dict[str, nn.Module] | None = None):
        pipe = self.pipeline_from_parts({**model.modules, **(modules or {})}, model.tokenizers, scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_controlnet(self, path: Path, model: Model) -> nn.Module:
        from .controlnet import load_flux_controlnet

        return load_flux_controlnet(path, model.denoiser, self.label)

    def control_pipeline(self, pipe, controlnets: list[nn.Module]):
        from diffusers import FluxControlNetPipeline

        out = FluxControlNetPipeline.from_pipe(pipe, controlnet=list(controlnets))
        out.set_progress_bar_config(disable=True)
        return out

    def control_call(self, maps, weights, starts, ends, modes) -> dict[str, Any]:
        # diffusers' Flux pipeline names the maps control_image; the other arguments as for SD, and the union
        # ControlNets' modes (None for a plain one in the list).
        call = super().control_call(maps, weights, starts, ends, modes)
        call["control_image"] = call.pop("image")
        if any(m is not None for m in modes):
            call["control_mode"] = list(modes)
        return call

    def pipeline_from_parts(self, modules: dict[str, nn.Module], tokenizers: dict[str, Any], scheduler):
        return FluxPipeline(scheduler=scheduler, **{k: modules[k] for k in ("transformer", "vae", "text_encoder",
                                                                            "text_encoder_2")}, **tokenizers)

    def resolution_for(self, prediction_type: str | None) -> int:
        return self.default_resolution

    def stated_prediction_type(self, path: Path, metadata: dict[str, str]) -> str | None:
        return "flow"

    # --- what a LoRA file says about its base ---------------------------------------------------------------
    def lora_metadata(self, prediction_type: str, variant: str = "dev") -> dict[str, str]:
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "modelspec.architecture": f"flux-1-{variant or 'dev'}/lora"}


def _has_bfl_name(path: str) -> bool:
    """Layers a kohya file can name: those with a BFL counterpart, except the final modulation, whose halves
    BFL stores in the other order (a LoRA there would need its rows swapped for every loader)."""
    if path == bfl.SWAPPED:
        return False
    try:
        bfl.bfl_module(path)
    except bfl.FluxLayoutError:
        return False
    return True


FAMILY = Flux()

__all__ = ["FAMILY", "Flux", "GUIDANCE_KEY", "IMG_IN_KEY", "MARKER"]
