"""Frozen-weight storage (base_weight_dtype) on a real-size UNet with random weights, in one run: peak memory and
s/step of each storage kind against the training dtype's own, same checkpoint, images and settings (kohya preset
rank 16, caches, gradient checkpointing).

    python benchmarks/weight_storage.py --model sd15 --resolution 512 --mixed-precision bf16
    python benchmarks/weight_storage.py --model sdxl --resolution 512 --mixed-precision bf16 --kinds auto fp8

Each kind runs in its own process. On CPU the peak is the resident set size sampled over the timed steps, after
freed heap pages are handed back (malloc_trim): the whole model (text encoders and VAE included, which sit in
host memory there too), so the differences between rows are what the storage saves; on CUDA it is
torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
KINDS = ("auto", "fp8", "int8", "nf4")


def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc): the bf16 weights each kind converted from were freed, but
    glibc keeps large freed blocks, so the resident set would still count them. Done for every kind alike."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figures then include freed pages
        pass


def run_kind(args, kind: str, ckpt: Path, data: Path, tmp: Path) -> dict:
    from train_step import PeakRSS, _peak_bytes, _sync

    from lora_scripts.config import validate_config
    from lora_scripts.training.trainer import Trainer

    cfg = dict(train_data_dir=data, metadata_path=data / "metadata.csv", base_model=ckpt, output_dir=tmp / kind,
               batch_size=args.batch, resolution=args.resolution, mixed_precision=args.mixed_precision,
               bucket_reso_steps=min(64, args.resolution), max_train_steps=10**6, verify_after_training=False,
               gradient_checkpointing=True, base_weight_dtype=kind)
    t = time.perf_counter()
    trainer = Trainer(validate_config(cfg)).setup()
    setup_s = time.perf_counter() - t
    _trim()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.set_train_mode()
    times, it = [], iter(trainer.loader)
    with PeakRSS() as rss:
        for step in range(args.warmup + args.steps):
            t = time.perf_counter()
            trainer.micro_step(next(it), step, 0)
            _sync(args.device)
            times.append(time.perf_counter() - t)
    timed = times[args.warmup:]
    return {"s_per_step": sum(timed) / len(timed), "peak_bytes": _peak_bytes(args.device, rss), "setup_s": setup_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        ckpt, data = (Path(x) for x in args.inputs.split(os.pathsep))
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_kind(args, args.worker, ckpt, data, Path(tmp))))
        return 0
    from train_step import build_inputs

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = build_inputs(argparse.Namespace(checkpoint=None, model=args.model, batch=args.batch,
                                                     steps=args.steps, warmup=args.warmup,
                                                     resolution=args.resolution), Path(tmp))
        for kind in args.kinds:
            cmd = [sys.executable, __file__, "--worker", kind, "--inputs", f"{ckpt}{os.pathsep}{data}"] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            results[kind] = json.loads(line[7:])
            print(f"{kind}: {results[kind]}", file=sys.stderr)
    ref = results[args.kinds[0]]
    print(f"\n{args.model} {args.resolution}px batch {args.batch} on {args.device}, {args.mixed_precision}, "
          "gradient checkpointing, kohya preset rank 16, caches")
    print("| base_weight_dtype | s/step | vs first row | peak memory | saved vs first row |")
    print("|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['s_per_step']:.2f} | {r['s_per_step'] / ref['s_per_step']:.2f}x | "
              f"{r['peak_bytes'] / 2**30:.2f} GiB | {(ref['peak_bytes'] - r['peak_bytes']) / 2**30:+.2f} GiB |")
    print("JSON " + json.dumps({"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
