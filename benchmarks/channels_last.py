"""channels_last on and off, on the same model and data, in one run: seconds per training step and their ratio.

    python benchmarks/channels_last.py --model tiny --resolution 32 --batch 4 --steps 40
    python benchmarks/channels_last.py --model sd15 --resolution 256 --batch 1 --steps 3

Two trainers are set up side by side (one per layout) and their steps alternate, so drift in the machine's
speed falls on both alike. A step is what the trainer does per optimizer step (VAE encode, text encoder,
UNet forward + backward with LoRA, AdamW). The median ratio off/on goes to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from step_time import build_checkpoint, make_data, timed_step  # noqa: E402


def _trainer(tmp: Path, ckpt: Path, data: Path, args, channels_last: bool):
    from lora_scripts.config import load_config
    from lora_scripts.training.trainer import Trainer

    cfg = {"train_data_dir": str(data), "metadata_path": str(data / "metadata.csv"), "base_model": str(ckpt),
           "output_dir": str(tmp / f"out{int(channels_last)}"), "lora_rank": 16, "batch_size": args.batch,
           "resolution": args.resolution, "max_train_steps": 10_000, "channels_last": channels_last,
           "cache_latents": args.cache}  # without the cache the VAE encode is part of the step (random_crop)
    (tmp / f"c{int(channels_last)}.yaml").write_text(yaml.safe_dump(cfg))
    return Trainer(load_config(tmp / f"c{int(channels_last)}.yaml")).setup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-cache", dest="cache", action="store_false", help="encode latents every step")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_checkpoint(args.model, tmp)
        data = make_data(tmp / "data", args.batch * 4, args.resolution)
        trainers = {flag: _trainer(tmp, ckpt, data, args, flag) for flag in (True, False)}
        for tr in trainers.values():
            tr.batches = (b for _ in range(10_000) for b in tr.loader)
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.warmup + args.steps):
            for flag, tr in trainers.items():
                t = timed_step(tr, next(tr.batches), i)
                if i >= args.warmup:
                    times[flag].append(t)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(json.dumps({"model": args.model, "resolution": args.resolution, "batch": args.batch,
                          "device": str(trainers[True].accelerator.device), "threads": torch.get_num_threads(),
                          "steps": args.steps, "latent_cache": args.cache, "s_per_step_channels_last": round(on, 4),
                          "s_per_step_contiguous": round(off, 4), "ratio_on_over_off": round(on / off, 3)}))


if __name__ == "__main__":
    sys.exit(main())
