"""The one typed training config: its fields, their help and their checks; frozen once validated. Loading it (YAML,
--set, paths, error messages, output_dir templates) is config_load.py, served from here too."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TargetPreset = Literal["kohya", "attn", "qv"]
CAPTION_EXTENSIONS = (".txt", ".caption", ".text", ".tags")  # sidecar caption files as kohya/OneTrainer read them
SEED_MAX = 2**32 - 1  # numpy's seed range, which every RNG we seed accepts (and A1111's 32-bit seeds)
_MAX_NAME_BYTES = 200  # a file name's limit is 255 bytes; room for suffixes such as -000004.safetensors
SCHEMA_VERSION = 1
PATH_KEYS = ("train_data_dir", "metadata_path", "base_model", "output_dir", "logging_dir", "validation_dir",
             "cache_dir", "clip_l", "t5xxl", "ae", "tokenizer_dir")
FLUX_FILE_KEYS = ("clip_l", "t5xxl", "ae")  # a Flux.1 base kept as separate files, as ComfyUI users have it


def _f(default: Any, help: str, typical: str | None = None, **kw: Any) -> Any:
    """A field whose one-line help is shown by `init`, the docs and error messages."""
    extra = {"typical": typical} if typical else None
    return Field(default, description=help, json_schema_extra=extra, **kw)


class SamplePrompt(BaseModel):
    """One preview image drawn during training; a plain string in the YAML is just the prompt."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(..., description="may weight this run's LoRA: <lora:OUTPUT_NAME:0.6> (default strength 1)")
    negative: str = ""
    seed: int | None = Field(None, description="default: the config's seed + the prompt's position")
    steps: int | None = Field(None, ge=1, le=200)
    cfg: float | None = Field(None, ge=0)
    size: int | None = Field(None, ge=64, le=4096, description="square side in pixels; default: resolution")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- the nine keys every config has -------------------------------------------------------
    train_data_dir: Path = _f(..., "folder of training images (kohya-style 'N_name' sub-folders repeat N times)")
    metadata_path: Path | None = _f(None, "metadata.csv with file_name,text columns; empty = .txt caption beside each image")
    base_model: Path = _f(..., "SD1.x/SD2.x/SDXL checkpoint (.safetensors/.ckpt, e.g. v1-5-pruned.safetensors), a Flux.1 "
                          "transformer file (flux1-dev.safetensors, with clip_l, t5xxl and ae) or a diffusers folder")
    lora_rank: int = _f(16, "LoRA rank (network dim): 8 for a simple style, 16 for complex scenes; file size grows linearly", "8-32", ge=1, le=1024)
    batch_size: int = _f(1, "images per step; lower it first if you run out of GPU memory", "1-8", ge=1)
    epochs: int = _f(10, "passes over the dataset; 10-15 for 50-100 images", "10-15", ge=1)
    learning_rate: float = _f(1e-4, "UNet LoRA learning rate; too high -> loss jumps around or NaN", "1e-4 to 2e-4", gt=0, le=1)
    output_dir: Path = _f(..., "where the LoRA, checkpoints, logs and loss curve go (use one folder per config version)")
    save_steps: int = _f(500, "save a resumable checkpoint every N optimizer steps (0 = only at the end)", "100-500", ge=0)

    # --- LoRA ------------------------------------------------------------------------------------
    output_name: str | None = _f(None, "file name of the LoRA, used as <lora:NAME:0.8>; default = basename of output_dir")
    lora_alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha/rank. Default = rank (scale 1.0)", "rank or rank/2", gt=0)
    conv_rank: int | None = _f(None, "kohya's conv_dim: also put LoRA on the UNet's ResNet blocks and down/up-samplers, "
                               "their 3x3 convolutions at this rank (LoCon-style layers in a plain kohya file, which "
                               "A1111, ComfyUI and diffusers load); off when unset", "4-16", ge=1, le=1024)
    conv_alpha: float | None = _f(None, "kohya's conv_alpha: alpha of those 3x3 convolutions; default = conv_rank",
                                  "conv_rank or 1", gt=0)
    network_type: Literal["lora", "locon", "loha", "lokr", "dora"] = _f(
        "lora", "lora = kohya's LoRA; locon = LoRA on the UNet's 3x3 convolutions too (conv_rank defaults to "
        "lora_rank); loha / lokr = LyCORIS' Hadamard / Kronecker-product layers (more capacity per byte of file); "
        "dora = LoRA with a learned magnitude per input channel (DoRA; with conv_rank: LoCon + DoRA); A1111 and "
        "ComfyUI load all of them; every family (on Flux.1 a fused q/k/v or linear1 layer trains as one module; "
        "locon there is lora: it has no convolutions)")
    lokr_factor: int = _f(-1, "LoKr: split each layer's sizes by this factor (-1 = as square as possible, LyCORIS' "
                          "default; 4-16 gives smaller files)", "-1 or 8", ge=-1)
    lora_dropout: float = _f(0.0, "dropout on the LoRA path during training", "0-0.1", ge=0, lt=1)
    lora_targets: TargetPreset | list[str] = _f(
        "kohya",
        "which layers get LoRA: kohya = every linear/1x1 conv in the transformer blocks, as sd-scripts (192 UNet modules, "
        "13.6 MB at rank 16 in SD1.5), attn = to_q/k/v/out (128, 6.4 MB), qv = to_q/to_v (64, 3.2 MB), or module names",
    )
    save_precision: Literal["fp16", "bf16", "fp32"] = _f("fp16", "dtype of the saved LoRA (fp16 as kohya writes; halves the file)")
    save_format: Literal["kohya", "diffusers"] = _f("kohya", "kohya = A1111/ComfyUI file; diffusers = also write pytorch_lora_weights.safetensors")
    train_text_encoder: bool = _f(False, "also train LoRA on the text encoder(s) (stronger trigger words, more overfitting risk)")
    text_encoder_lr: float | None = _f(None, "text-encoder LoRA learning rate; default = learning_rate", "5e-5", gt=0, le=1)
    text_encoder_2_lr: float | None = _f(None, "SDXL's second text encoder (OpenCLIP-bigG) LoRA learning rate, as "
                                         "sd-scripts' second text_encoder_lr value; default = text_encoder_lr", "5e-5",
                                         gt=0, le=1)

    # --- Flux.1 ------------------------------------------------------------------------------------
    clip_l: Path | None = _f(None, "Flux.1 as separate files: the CLIP-L text encoder (clip_l.safetensors; ComfyUI's "
                             "models/text_encoders or models/clip)")
    t5xxl: Path | None = _f(None, "Flux.1 as separate files: the T5-XXL text encoder (t5xxl_fp16.safetensors, or an "
                            "fp8 one: weights are read in the training dtype)")
    ae: Path | None = _f(None, "Flux.1 as separate files: the autoencoder (ae.safetensors; ComfyUI's models/vae)")
    tokenizer_dir: Path | None = _f(None, "folder with Flux's T5 tokenizer (tokenizer.json or spiece.model); default: "
                                    "the diffusers folder's tokenizer_2, a ComfyUI install beside the model files, or "
                                    "the local Hugging Face cache")
    max_sequence_length: int | None = _f(None, "T5 tokens per caption for Flux.1; default 512 (dev), 256 (schnell)",
                                         "256-512", ge=1, le=512)
    guidance_scale: float = _f(1.0, "Flux.1-dev: the guidance value the transformer is given while training (1.0 as "
                               "sd-scripts and ai-toolkit recommend for LoRAs; schnell has no guidance input)",
                               "1.0", ge=0, le=100)
    timestep_sampling: Literal["flux_shift", "shift", "sigmoid", "uniform"] = _f(
        "flux_shift", "flow-matching noise levels for Flux.1: flux_shift = shifted by image size as FluxPipeline "
        "samples; shift = fixed discrete_flow_shift; sigmoid = logit-normal; uniform")
    sigmoid_scale: float = _f(1.0, "spread of the logit-normal noise levels (flux_shift, shift, sigmoid)", "1.0",
                              gt=0, le=10)
    discrete_flow_shift: float = _f(3.0, "the fixed shift of timestep_sampling: shift (3.0 as SD3/Flux schedulers; "
                                    "higher trains noisier steps)", "3.0", gt=0, le=100)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = _f(
        "none", "flow-matching loss weight per noise level (diffusers' weighting schemes); none for most LoRAs")

    # --- data --------------------------------------------------------------------------------------
    resolution: int = _f(512, "training resolution in pixels (512 for SD1.x and SD2 512-base, 768 for SD2 768-v, 1024 for SDXL); images are resized and cropped to it", "512", ge=32, le=4096)
    enable_bucket: bool = _f(True, "aspect-ratio bucketing: non-square images keep their shape instead of being centre-cropped")
    min_bucket_reso: int | None = _f(None, "smallest bucket side; default = resolution / 2", ge=32)
    max_bucket_reso: int | None = _f(None, "largest bucket side; default = resolution * 2", ge=32)
    bucket_reso_steps: int = _f(64, "bucket sides are multiples of this (64 for SD; must be a multiple of 8)", "64", ge=8)
    flip_aug: bool = _f(False, "randomly mirror images left-right (doubles variety; avoid for text or asymmetric subjects)")
    random_crop: bool = _f(False, "random instead of centre crop when an image is larger than its bucket")
    caption_dropout: float = _f(0.0, "probability of training on an empty caption (helps the LoRA generalise)", "0-0.1", ge=0, le=1)
    shuffle_caption: bool = _f(False, "shuffle comma-separated tags each step (for tag-style captions)")
    max_token_length: Literal[75, 150, 225] = _f(75, "caption tokens the text encoder(s) read: 150 or 225 encode "
                                                   "longer captions in 75-token windows, as sd-scripts' "
                                                   "max_token_length (tag-heavy captions); longer ones are cut, "
                                                   "with a warning counting what is lost", "75 or 225")
    keep_tokens: int = _f(0, "with shuffle_caption or caption_tag_dropout: keep the first N tags (e.g. the trigger "
                          "word) in place and never dropped", ge=0)
    caption_tag_dropout: float = _f(0.0, "drop each comma-separated tag after the first keep_tokens with this "
                                    "probability, per step (kohya's caption_tag_dropout_rate): the LoRA learns each "
                                    "word on its own instead of the whole caption template", "0-0.3", ge=0, lt=1)
    caption_extension: str = _f(".txt", "extension of sidecar caption files when metadata_path is empty")
    skip_bad_images: bool = _f(False, "skip unreadable images / empty captions instead of stopping with the list")
    dataloader_workers: int = _f(0, "background processes that decode images (0 = in the training process)", ge=0)

    cache_latents: bool = _f(True, "encode each image (and its mirror with flip_aug) once instead of every step; "
                             "same results, much faster (off automatically with random_crop)")
    cache_latents_to_disk: bool = _f(False, "also keep the latent cache on disk so later runs skip encoding")
    cache_dir: Path | None = _f(None, "where the disk cache lives; default = train_data_dir/.lora-scripts-cache")
    cache_text_encoder_outputs: bool = _f(True, "compute each caption's text embedding once when the text encoder "
                                          "is frozen and captions are not shuffled or dropped")
    cache_text_encoder_outputs_to_disk: bool = _f(False, "also keep the text cache on disk (in cache_dir) so later "
                                                  "runs skip the text encoders' work; worth it for Flux's T5-XXL")

    # --- optimisation --------------------------------------------------------------------------
    seed: int = _f(42, "random seed, 0 to 4294967295; the same seed and config give the same LoRA",
                   ge=0, le=SEED_MAX)
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "bf16 on recent NVIDIA GPUs (RTX 30xx+), fp16 on older ones, no on CPU")
    gradient_checkpointing: bool = _f(False, "trade ~30% speed for much less GPU memory")
    base_weight_dtype: Literal["auto", "bf16", "fp16", "fp8", "int8", "nf4"] = _f(
        "auto", "how the frozen UNet/transformer weights are stored: auto = the training dtype; fp8 or int8 "
        "(torchao, Linear layers) halve bf16's memory, nf4 (bitsandbytes, Linear layers) quarters it (each layer "
        "computes in the training dtype; pair them with gradient_checkpointing)")
    text_encoder_weight_dtype: Literal["auto", "bf16", "fp16", "fp8", "int8", "nf4"] = _f(
        "auto", "how the frozen text encoders' weights are stored (Flux's T5-XXL: 9.5 GB in bf16, 4.8 in fp8)")
    offload: str = _f("none", "block swap for GPUs too small for the frozen weights: blocks:N keeps the frozen "
                      "weights of the N largest UNet/transformer blocks in host RAM and copies each to the GPU when "
                      "it runs (forward and backward; the next block is copied while one computes); auto picks N "
                      "from the GPU's free memory at start; needs gradient_checkpointing", "none, or what `check "
                      "--vram` proposes")
    channels_last: bool = _f(True, "keep the UNet and VAE in channels-last memory layout (VAE encode 1.1-1.3x "
                             "faster on CPU, usual tensor-core layout on GPUs; same results)")
    torch_compile: bool = _f(False, "compile the UNet with torch.compile: the first steps are slow while it "
                             "compiles (minutes), later ones faster on GPUs; on CPU measured slower; same results")
    gradient_accumulation_steps: int = _f(1, "accumulate N batches per optimizer step (effective batch = batch_size * N)", ge=1)
    max_train_steps: int | None = _f(None, "stop after N optimizer steps (overrides epochs)", ge=1)
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"] = _f(
        "constant", "learning-rate schedule over the run")
    lr_warmup_steps: int = _f(0, "steps of linear warm-up at the start", ge=0)
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "prodigy", "lion", "adafactor", "adamw_schedulefree"] = _f(
        "adamw", "adamw (fused/foreach kernels where available); adamw8bit (bitsandbytes, NVIDIA GPUs: a quarter of "
        "the state memory; paged_adamw8bit pages it to host RAM when the GPU runs short); prodigy (finds the step size itself: learning_rate 1.0); lion (3-10x lower "
        "learning_rate); adafactor; adamw_schedulefree (no schedule: lr_scheduler constant)")
    optimizer_args: dict[str, Any] = _f({}, "extra arguments of the optimizer's class, e.g. {d_coef: 2} for prodigy "
                                        "or {betas: [0.95, 0.98]} for lion (kohya's list form ['d_coef=2'] works too)")
    block_lr: dict[str, float] = _f(
        {}, "learning-rate multipliers per block of the denoiser, by the names `inspect` gives them (SD1/SD2: "
        "unet.down_0 .. unet.mid .. unet.up_3; SDXL: unet.input_4, unet.middle, unet.output_1; Flux.1: "
        "transformer.double_blocks / transformer.single_blocks) or the start of a name (unet.down = every down "
        "block); other layers keep learning_rate; 0 leaves a block's LoRA as it starts (sd-scripts' "
        "down_lr_weight / mid_lr_weight / up_lr_weight idea; prodigy takes only 0 and 1)", "{unet.down: 0.5, unet.up: 1.5}")
    weight_decay: float = _f(0.01, "weight decay (decoupled, as AdamW's)", ge=0)
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    noise_offset: float = _f(0.0, "offset noise: lets the model make very dark or bright images", "0.05-0.1", ge=0, le=1)
    min_snr_gamma: float | None = _f(None, "Min-SNR loss weighting (Hang et al. 2023); faster convergence", "5", gt=0)
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = _f(
        "auto", "what the base model predicts: auto = what its file or folder says (SD1.x: epsilon); SD2.x single "
        "files do not say, so set epsilon for 512-base models or v_prediction for 768-v models")
    zero_terminal_snr: bool = _f(False, "rescale the noise schedule to zero SNR at its last step (Lin et al. 2023), "
                                 "for v-prediction models trained that way; needs v_prediction")
    on_nonfinite: Literal["skip", "stop"] = _f(
        "skip", "on a NaN/inf loss or gradient: skip = drop that step (stop after 3 in a row), stop = stop at once; "
        "no NaN weights are ever saved and the last checkpoint stays valid")
    # --- previews and validation ---------------------------------------------------------------------
    sample_prompts: list[str | SamplePrompt] = _f(
        [], "prompts drawn during training into output_dir/samples (and TensorBoard); each a string or "
        "{prompt, negative, seed, steps, cfg, size}; <lora:OUTPUT_NAME:0.6> sets this run's strength")
    sample_every_n_steps: int | None = _f(None, "draw the sample_prompts every N optimizer steps", ge=1)
    sample_every_n_epochs: int | None = _f(None, "draw the sample_prompts after every N epochs", ge=1)
    sample_steps: int | None = _f(None, "denoising steps per sample image; default 20 (SD), 28 (Flux.1-dev), 4 "
                                  "(schnell)", "20-30", ge=1, le=200)
    sample_sampler: Literal["euler_a", "euler", "ddim", "dpm++"] = _f("euler_a", "sampler for sample images")
    sample_cfg: float | None = _f(None, "guidance scale for sample images; default 7 (SD), 3.5 (Flux.1-dev: its "
                                  "distilled guidance), 0 (schnell)", "5-8", ge=0)
    validation_split: float = _f(0.0, "hold out this share of the images (chosen by seed) to measure validation "
                                 "loss; 0 = none", "0.1", ge=0, lt=0.9)
    validation_dir: Path | None = _f(None, "a separate folder of captioned images for validation loss "
                                     "(instead of validation_split)")
    validate_every_n_steps: int | None = _f(None, "validation loss every N steps; default: after every epoch", ge=1)
    verify_after_training: bool = _f(
        True, "after saving, reload the LoRA as diffusers and A1111/ComfyUI do and check every key is applied "
        "(seconds; the base model is read once more)")
    save_every_n_epochs: int | None = _f(None, "also write the LoRA after every N epochs (NAME-000004.safetensors)", ge=1)
    save_last_n: int | None = _f(None, "keep only the newest N checkpoints (bounds disk use); empty = keep all", ge=1)
    logging_dir: Path | None = _f(None, "TensorBoard log folder; default = output_dir/logs")
    schema_version: int = _f(SCHEMA_VERSION, "config format version (for migrations of old files)", ge=1, le=SCHEMA_VERSION)

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _kohya_optimizer_args(cls, v: Any) -> Any:
        """sd-scripts' form: a list of "key=value" strings, values read as YAML (True, 0.9, [0.9, 0.99])."""
        if not isinstance(v, list):
            return v
        out = {}
        for item in v:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"{item!r}: expected key=value (e.g. d_coef=2), or write a mapping {{d_coef: 2}}")
            key, value = item.split("=", 1)
            value = value.strip().replace("True", "true").replace("False", "false").replace("None", "null")
            if value.startswith("(") and value.endswith(")"):  # a Python tuple, e.g. betas=(0.9,0.99)
                value = f"[{value[1:-1]}]"
            out[key.strip()] = yaml.safe_load(value)
        return out

    @field_validator("block_lr")
    @classmethod
    def _block_multipliers(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if not k.strip() or not math.isfinite(m) or m < 0}
        if bad:
            raise ValueError(f"{bad}: each block needs a name and a multiplier >= 0 (e.g. {{unet.down: 0.5}})")
        return v

    @field_validator("train_data_dir")
    @classmethod
    def _data_dir_exists(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError("folder does not exist; point it at your training images")
        return v

    @field_validator("metadata_path")
    @classmethod
    def _metadata_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("file does not exist; run `lora-scripts label` to create it, or remove the key to use .txt captions")
        return v

    @field_validator("base_model")
    @classmethod
    def _base_exists(cls, v: Path) -> Path:
        if not v.exists():
            raise ValueError("file does not exist; download a Stable Diffusion 1.x, 2.x, SDXL or Flux.1 checkpoint "
                             "(e.g. v1-5-pruned.safetensors, sd_xl_base_1.0.safetensors, flux1-dev.safetensors) and "
                             "point base_model at it")
        return v

    @field_validator("clip_l", "t5xxl", "ae")
    @classmethod
    def _component_file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("file does not exist; point it at the Flux component file (ComfyUI keeps them in "
                             "models/text_encoders, models/clip or models/vae)")
        return v

    @field_validator("tokenizer_dir")
    @classmethod
    def _tokenizer_dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError("folder does not exist; point it at a folder holding tokenizer.json or spiece.model")
        return v

    @field_validator("validation_dir")
    @classmethod
    def _validation_dir_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_dir():
            raise ValueError("folder does not exist; point it at captioned images the LoRA does not train on")
        return v

    @field_validator("sample_prompts")
    @classmethod
    def _prompts_as_objects(cls, v: list) -> list:
        return [SamplePrompt(prompt=p) if isinstance(p, str) else p for p in v]

    @field_validator("output_name")
    @classmethod
    def _name_is_a_file_stem(cls, v: str | None) -> str | None:
        return v if v is None else check_file_stem(v)

    @field_validator("caption_extension")
    @classmethod
    def _caption_extension_is_text(cls, v: str) -> str:
        # The web UI writes captions to IMAGE_STEM + caption_extension: an image or config extension here
        # would overwrite a training image or create configs, so only text-file extensions are accepted.
        ext = v.strip().lower()
        ext = ext if ext.startswith(".") else "." + ext
        if ext not in CAPTION_EXTENSIONS:
            raise ValueError(f"caption files must be text files; use one of {', '.join(CAPTION_EXTENSIONS)}")
        return ext

    @field_validator("bucket_reso_steps", "resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by 8)")
        return v

    @field_validator("offload")
    @classmethod
    def _offload_form(cls, v: str) -> str:
        if v in ("none", "auto") or re.fullmatch(r"blocks:[1-9][0-9]*", v):
            return v
        raise ValueError("expected none, auto or blocks:N with N >= 1 (e.g. blocks:20)")

    @field_validator("lora_targets")
    @classmethod
    def _targets_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list trains nothing; use a preset (kohya, attn, qv) or module names like to_q")
        return v

    @model_validator(mode="before")
    @classmethod
    def _locon_conv_rank(cls, data: Any) -> Any:
        """network_type: locon is LoRA with the 3x3 convolutions trained too: conv_rank defaults to lora_rank."""
        if isinstance(data, dict) and data.get("network_type") == "locon" and data.get("conv_rank") is None:
            data = {**data, "conv_rank": data.get("lora_rank", cls.model_fields["lora_rank"].default)}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainConfig":
        if self.min_bucket_reso and self.max_bucket_reso and self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError("min_bucket_reso must not exceed max_bucket_reso")
        if self.validation_split and self.validation_dir:
            raise ValueError("set validation_split or validation_dir, not both")
        if self.conv_alpha is not None and self.conv_rank is None:
            raise ValueError("conv_alpha is set but conv_rank is not: set conv_rank (e.g. 8) to train the 3x3 "
                             "convolutions, or remove conv_alpha")
        if self.lokr_factor == 0 or (self.lokr_factor != -1 and self.network_type != "lokr"):
            raise ValueError(f"lokr_factor = {self.lokr_factor}: " + ("use -1 (as square as possible) or a factor "
                             ">= 1" if self.lokr_factor == 0 else f"it applies to network_type: lokr, not "
                             f"{self.network_type}; remove it or set network_type: lokr"))
        if self.network_type == "dora":
            for key in ("base_weight_dtype",) + (("text_encoder_weight_dtype",) if self.train_text_encoder else ()):
                if getattr(self, key) in ("int8", "nf4"):
                    raise ValueError(f"network_type = dora with {key} = {getattr(self, key)}: DoRA reads the "
                                     f"frozen weight every step; use {key}: fp8 (or auto)")
        if self.network_type in ("loha", "lokr"):
            for key in ("base_weight_dtype",) + (("text_encoder_weight_dtype",) if self.train_text_encoder else ()):
                if getattr(self, key) == "nf4":
                    raise ValueError(f"network_type = {self.network_type} with {key} = nf4: {self.network_type} "
                                     "shapes its weight change like the frozen weight, which bitsandbytes keeps "
                                     f"packed in 4 bits; use {key}: int8 or fp8, or network_type: lora")
        if self.save_format == "diffusers" and self.network_type in ("loha", "lokr", "dora"):
            raise ValueError(f"save_format = diffusers with network_type: {self.network_type}: diffusers reads "
                             "plain LoRA only; use save_format: kohya (A1111 and ComfyUI load LoHa/LoKr/DoRA)")
        if self.lora_dropout and self.network_type in ("loha", "lokr"):
            raise ValueError(f"lora_dropout = {self.lora_dropout} with network_type: {self.network_type}: dropout "
                             "is for lora/locon layers; remove lora_dropout")
        if self.offload != "none":
            if not self.gradient_checkpointing:
                raise ValueError(f"offload = {self.offload!r} needs gradient_checkpointing: true (without it every "
                                 "block's weights stay on the GPU until the backward pass, and nothing is saved)")
            if self.base_weight_dtype in ("int8", "nf4"):
                raise ValueError(f"offload = {self.offload!r} with base_weight_dtype = {self.base_weight_dtype}: "
                                 "block swap moves plain weights; use base_weight_dtype: fp8 (as sd-scripts' fp8_base "
                                 "with blocks_to_swap), or offload: none")
            if self.torch_compile:
                raise ValueError(f"offload = {self.offload!r} with torch_compile: true: the swap runs between "
                                 "blocks, outside a compiled graph; set torch_compile: false")
        _outputs_apart_from_data(self)
        return self

    # --- derived values (never written back) ---------------------------------------------------
    @property
    def name(self) -> str:
        return self.output_name or self.output_dir.name

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def conv_alpha_value(self) -> float | None:
        """The 3x3 convolutions' alpha (None when they are not trained)."""
        if self.conv_rank is None:
            return None
        return self.conv_alpha if self.conv_alpha is not None else float(self.conv_rank)

    @property
    def component_files(self) -> dict[str, Path]:
        """A base kept as separate files: the others by kind (Flux.1's clip_l, t5xxl, ae), those that are set."""
        return {k: getattr(self, k) for k in FLUX_FILE_KEYS if getattr(self, k) is not None}

    @property
    def te_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    def lr_of(self, position: int) -> float:
        """The learning rate of the trainable component at this position (Family.trainable order): the denoiser,
        then each text encoder."""
        return (self.learning_rate, self.te_lr, self.text_encoder_2_lr or self.te_lr)[min(position, 2)]

    @property
    def bucket_range(self) -> tuple[int, int]:
        lo = self.min_bucket_reso or max(self.bucket_reso_steps, self.resolution // 2)
        hi = self.max_bucket_reso or self.resolution * 2
        return lo, hi

    @property
    def log_dir(self) -> Path:
        return self.logging_dir or self.output_dir / "logs"

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_file_stem(v: str) -> str:
    """output_name becomes NAME.safetensors inside output_dir: a folder part would write elsewhere (even outside
    a web-UI workspace), so only a plain file name is accepted."""
    if not v.strip() or v.strip(".") == "":
        raise ValueError("must be a file name such as sci_lab_lora (it becomes NAME.safetensors)")
    if any(c in v for c in ("/", "\\", "\0", ":")) or ".." in v:
        raise ValueError("must be a plain file name without folders ('/', '\\', ':' or '..'); it names "
                         "NAME.safetensors inside output_dir - to write elsewhere, change output_dir")
    if len(v.encode()) > _MAX_NAME_BYTES:
        raise ValueError(f"is {len(v.encode())} bytes long; file names may have at most {_MAX_NAME_BYTES}")
    return v


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _outputs_apart_from_data(config: "TrainConfig") -> None:
    """Files we write must not land in a folder we read images from: the next run would scan loss.png and
    samples as training images (and `label` would caption them), or an overwrite would delete the dataset."""
    outputs = {"output_dir": config.output_dir}
    if config.logging_dir:
        outputs["logging_dir"] = config.logging_dir
    inputs = {"train_data_dir": config.train_data_dir}
    if config.validation_dir:
        inputs["validation_dir"] = config.validation_dir
    for out_key, out in outputs.items():
        if "{" in str(out):
            continue  # a template; judged once it is filled in
        for in_key, data in inputs.items():
            if _inside(out, data):
                raise ValueError(f"{out_key} {out} is inside {in_key} {data}: the LoRA, samples and loss chart "
                                 f"would be read as training images. Put {out_key} next to the images, e.g. "
                                 f"./output/{config.output_name or out.name}")
            if _inside(data, out):
                raise ValueError(f"{in_key} {data} is inside {out_key} {out}: starting over there (--overwrite) "
                                 f"would delete training images. Choose an {out_key} that does not hold the dataset")


# The loading half (YAML, --set, paths, validation errors, output_dir templates) lives in config_load.py; its
# functions are served from here too, on first use, so config_load may import this module at its top.
_LOADING = frozenset({"parse_override", "validate_config", "fill_template", "resolve_paths", "load_config",
                      "config_from_dict", "problem_key", "_UniqueKeyLoader"})


def __getattr__(name: str):
    if name in _LOADING:
        from . import config_load

        return getattr(config_load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
