"""Batches of same-sized images. Every random choice (order, flip, crop, caption shuffle/dropout) is drawn
from (seed, epoch, position), so a run is reproducible and a resumed run sees exactly the same data."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from ..config import TrainConfig
from .buckets import make_buckets, nearest_bucket
from .images import fit_and_place, open_rgb, placement, to_tensor
from .scan import Sample


@dataclass(frozen=True)
class Item:
    sample: Sample
    bucket: tuple[int, int]


def build_items(samples: list[Sample], config: TrainConfig) -> list[Item]:
    """One Item per repeat, each assigned its aspect-ratio bucket (or the square one)."""
    if config.enable_bucket:
        lo, hi = config.bucket_range
        buckets = make_buckets(config.resolution, lo, hi, config.bucket_reso_steps)
    else:
        buckets = [(config.resolution, config.resolution)]
    return [Item(s, nearest_bucket(*s.size, buckets)) for s in samples for _ in range(s.repeats)]


def process_caption(caption: str, config: TrainConfig, rng: random.Random) -> str:
    if config.caption_dropout and rng.random() < config.caption_dropout:
        return ""
    if config.shuffle_caption or config.caption_tag_dropout:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[: config.keep_tokens], tags[config.keep_tokens :]
        if config.caption_tag_dropout:
            tail = [t for t in tail if rng.random() >= config.caption_tag_dropout]
        if config.shuffle_caption:
            rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption


class LoraDataset(Dataset):
    """Indexed by (item index, epoch) so augmentation randomness does not depend on worker processes."""

    def __init__(self, items: list[Item], config: TrainConfig, latent_cache=None):
        self.items = items
        self.config = config
        self.latent_cache = latent_cache  # data.cache.LatentCache, already filled; None = encode per step

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        rng = random.Random(f"{self.config.seed}/{epoch}/{index}")
        item = self.items[index]
        if self.latent_cache is not None:  # the same random draws, in the same order, as the uncached path
            flip = self.config.flip_aug and rng.random() < 0.5
            cached = self.latent_cache.get(item, flip)
            return {"latent_mean": cached.mean, "latent_logvar": cached.logvar,
                    "placement": placement(item.sample.size, item.bucket, flip=flip).ids(),
                    "caption": process_caption(item.sample.caption, self.config, rng)}
        im, place = fit_and_place(open_rgb(item.sample.path), item.bucket, rng if self.config.random_crop else None)
        flip = self.config.flip_aug and rng.random() < 0.5
        return {"pixel_values": to_tensor(im, flip), "placement": (place.flipped() if flip else place).ids(),
                "caption": process_caption(item.sample.caption, self.config, rng)}


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches that never mix buckets. Call set_epoch() before iterating each epoch."""

    def __init__(self, items: list[Item], batch_size: int, seed: int, drop_last: bool = False):
        # Not `batch_size`: accelerate's BatchSamplerShard (several processes) reads that and then takes every
        # batch but the epoch's last as full. A bucket's last batch is smaller: whole rounds ending in one were
        # skipped, the last round topped up with other buckets' images (a batch Collate cannot stack), and the
        # processes left with different batch counts. Without it accelerate deals whole batches in turn.
        self.per_batch = batch_size
        self.seed = seed
        self.epoch = 0
        self.drop_last = drop_last
        self.by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            self.by_bucket[item.bucket].append(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/order/{epoch}")
        out = []
        for bucket in sorted(self.by_bucket):
            idx = self.by_bucket[bucket][:]
            rng.shuffle(idx)
            for start in range(0, len(idx), self.per_batch):
                chunk = idx[start : start + self.per_batch]
                if len(chunk) == self.per_batch or not self.drop_last:
                    out.append(chunk)
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches(self.epoch):
            yield [(i, self.epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


class Collate:
    """Stack images and tokenize captions the family's way (a class, not a closure, so worker processes can
    pickle it)."""

    def __init__(self, family, tokenizers: dict, chunks: int = 1):
        self.family = family
        self.tokenizers = tokenizers
        self.chunks = chunks  # 75-token windows per caption (max_token_length / 75)

    def __call__(self, examples: list[dict]) -> dict:
        captions = [e["caption"] for e in examples]
        batch = {"tokens": self.family.tokenize(self.tokenizers, captions, self.chunks), "captions": captions}
        for key in ("pixel_values", "latent_mean", "latent_logvar", "placement"):
            if key in examples[0]:
                batch[key] = torch.stack([e[key] for e in examples])
        return batch
