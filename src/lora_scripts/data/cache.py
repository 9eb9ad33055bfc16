"""Latent and text-embedding caches: the VAE encode of a 512 px image costs more than the LoRA step itself,
and the frozen text encoder gives the same output for the same caption every time.

Latents: each (image, bucket, flip) is encoded once. The key is a hash of the image's bytes, its bucket, the
flip and the VAE's identity, so editing an image or changing the resolution re-encodes exactly that entry.
The cache keeps the VAE's mean and log-variance, not one sample: training still draws a fresh latent
sample each step from the step's own generator, exactly as an uncached encode would. Random crops change
the pixels every step, so they are encoded per step (the cache is off then, and the log says so).

Text: with the text encoder frozen and captions used as written (no shuffle, no dropout), each caption's
hidden states are computed once. On disk too where asked: Flux's T5-XXL is 9 GB of weights and the slowest part
of a run's start. The key is a hash of the caption's token ids (so the tokenizer, T5 sequence length and
75-token windows are all in it) and of the encoders' identity (config, dtype and a strided sample of every
weight: a fine-tuned CLIP or another precision gives other entries).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..config import TrainConfig
from .dataset import Item
from .images import fit_to_bucket, open_rgb, to_tensor

log = logging.getLogger(__name__)


def vae_identity(vae) -> str:
    """Changes when the VAE's weights or scaling change: a few weights' bytes and the config."""
    h = hashlib.sha256(repr(sorted(vae.config.items())).encode())
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "encoder.conv_out.weight"):
        t = dict(vae.named_parameters()).get(name)
        if t is not None:
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def content_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]


def latent_key(image_hash: str, bucket: tuple[int, int], flip: bool, vae_id: str) -> str:
    return f"{image_hash}-{bucket[0]}x{bucket[1]}-{'flip' if flip else 'plain'}-{vae_id}"


@dataclass
class CachedLatent:
    mean: torch.Tensor  # [4, h, w]
    logvar: torch.Tensor


class LatentCache:
    """In RAM, optionally mirrored on disk (one small .safetensors per entry) so the next run skips encoding."""

    def __init__(self, vae_id: str, folder: Path | None = None):
        self.vae_id = vae_id
        self.folder = folder
        self.entries: dict[str, CachedLatent] = {}
        self.hits = self.encoded = 0
        self._hashes: dict[Path, str] = {}

    def key(self, item: Item, flip: bool) -> str:
        path = item.sample.path
        if path not in self._hashes:
            self._hashes[path] = content_hash(path)
        return latent_key(self._hashes[path], item.bucket, flip, self.vae_id)

    def get(self, item: Item, flip: bool) -> CachedLatent:
        return self.entries[self.key(item, flip)]

    def _load_from_disk(self, key: str) -> CachedLatent | None:
        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        try:
            t = load_file(str(self.folder / f"{key}.safetensors"))
            return CachedLatent(t["mean"], t["logvar"])
        except Exception:  # a damaged cache file is re-encoded, never trusted
            return None

    @torch.no_grad()
    def fill(self, items: list[Item], flips: tuple[bool, ...], vae, device, show_progress: bool = True) -> None:
        todo = []
        for item in {id(i.sample): i for i in items}.values():  # repeats share one entry
            for flip in flips:
                key = self.key(item, flip)
                if key in self.entries:
                    continue
                found = self._load_from_disk(key)
                if found is not None:
                    self.entries[key] = found
                    self.hits += 1
                else:
                    todo.append((key, item, flip))
        for key, item, flip in tqdm(todo, desc="caching latents", unit="img", disable=not show_progress or not todo):
            pixels = to_tensor(fit_to_bucket(open_rgb(item.sample.path), item.bucket, None), flip)
            dist = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist
            entry = CachedLatent(dist.mean[0].cpu(), dist.logvar[0].cpu())
            self.entries[key] = entry
            self.encoded += 1
            if self.folder is not None:
                self._save(key, entry)
        if todo or self.hits:
            log.info("latent cache: %d encoded, %d read from disk%s", self.encoded, self.hits,
                     f" ({self.folder})" if self.folder else "")

    def _save(self, key: str, entry: CachedLatent) -> None:
        from ..atomic import atomic_save_safetensors

        atomic_save_safetensors({"mean": entry.mean.contiguous(), "logvar": entry.logvar.contiguous()},
                                self.folder / f"{key}.safetensors")


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same draw as diffusers' DiagonalGaussianDistribution.sample(generator) on these parameters."""
    from diffusers.utils.torch_utils import randn_tensor

    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    return mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)


def latent_cache_plan(config: TrainConfig) -> tuple[bool, str]:
    """(use it?, why not)."""
    if not config.cache_latents:
        return False, "cache_latents is false"
    if config.random_crop:
        return False, "random_crop changes the pixels every step, so latents are encoded per step"
    return True, ""


def offload_plan(config: TrainConfig) -> tuple[bool, bool]:
    """(VAE off the GPU, text encoders off the GPU) during training: each once its cache holds everything the
    steps need, unless previews or validation still run it. For SDXL this is what fits 8 GB: the encoders and
    the VAE are a fifth of the frozen weights."""
    observed = bool(config.sample_prompts or config.validation_split or config.validation_dir)
    return (latent_cache_plan(config)[0] and not observed, text_cache_plan(config)[0] and not observed)


def text_cache_plan(config: TrainConfig) -> tuple[bool, str]:
    if not config.cache_text_encoder_outputs:
        return False, "cache_text_encoder_outputs is false"
    if config.train_text_encoder:
        return False, "the text encoder is trained"
    if config.shuffle_caption or config.caption_dropout or config.caption_tag_dropout:
        return False, "captions change per step (shuffle_caption / caption_dropout / caption_tag_dropout)"
    return True, ""


def encoders_identity(encoders: dict) -> str:
    """Changes when any encoder's config, dtype or weights change. Every tensor is sampled at ~256 evenly spaced
    elements: hashing all of T5-XXL's 9 GB would cost more than encoding the captions."""
    h = hashlib.sha256()
    for name in sorted(encoders):
        module = encoders[name]
        h.update(f"{name}:{type(module).__name__}:{getattr(module, 'config', '')!r}".encode())
        for pname, t in module.named_parameters():
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)]
            h.update(f"{pname}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def text_key(family_name: str, tokens: dict, encoders_id: str) -> str:
    h = hashlib.sha256(f"{family_name}:{encoders_id}".encode())
    for name in sorted(tokens):
        t = tokens[name]
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.cpu().numpy().tobytes())
    return f"text-{h.hexdigest()[:32]}"


class TextCache:
    """Each caption's conditioning, encoded once by the family's own text encoders (frozen ones only); in RAM,
    optionally mirrored on disk like the latent cache."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.entries: dict = {}
        self.hits = self.encoded = 0

    def _load_from_disk(self, key: str):
        from ..families import Conditioning

        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        try:
            t = load_file(str(self.folder / f"{key}.safetensors"))
            return Conditioning(t.pop("hidden"), {k.removeprefix("extras."): v for k, v in t.items()})
        except Exception:  # a damaged cache file is encoded again, never trusted
            return None

    def _save(self, key: str, entry) -> None:
        from ..atomic import atomic_save_safetensors

        tensors = {"hidden": entry.hidden.contiguous(), **{f"extras.{k}": v.contiguous() for k, v in entry.extras.items()}}
        atomic_save_safetensors(tensors, self.folder / f"{key}.safetensors")

    @torch.no_grad()
    def fill(self, captions: list[str], model, device, show_progress: bool = True) -> None:
        family = model.family
        todo = sorted(set(captions) - set(self.entries))
        encoders_id = encoders_identity(model.text_encoders) if self.folder is not None and todo else ""
        for caption in tqdm(todo, desc="caching text", unit="caption",
                            disable=not show_progress or len(todo) < 20):
            tokens = family.tokenize(model.tokenizers, [caption], model.token_chunks)
            key = text_key(family.name, tokens, encoders_id) if self.folder is not None else ""
            found = self._load_from_disk(key) if key else None
            if found is not None:
                self.entries[caption] = found
                self.hits += 1
                continue
            entry = family.encode(model.text_encoders, tokens, device).rows()[0].to("cpu")
            self.entries[caption] = entry
            self.encoded += 1
            if self.folder is not None:
                self._save(key, entry)
        if self.folder is not None and todo:
            log.info("text cache: %d encoded, %d read from disk (%s)", self.encoded, self.hits, self.folder)

    def get(self, captions: list[str]):
        from ..families import Conditioning

        return Conditioning.stack([self.entries[c] for c in captions])
