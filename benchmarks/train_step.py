"""Our training step against the diffusers reference loop, on the same model, in one run: steps/s ratios,
peak memory and MFU.

    python benchmarks/train_step.py --model tiny --resolution 32 --batch 4
    python benchmarks/train_step.py --model sd15 --resolution 256 --batch 1 --steps 3
    python benchmarks/train_step.py --model sd15 --resolution 512 --batch 1 --steps 2 --rounds 2
    python benchmarks/train_step.py --model sd15 --resolution 512 --batch 1 --steps 2 --device cuda --mixed-precision bf16
    python benchmarks/train_step.py --model sdxl --resolution 512 --batch 1 --steps 2 --mixed-precision bf16
    python benchmarks/train_step.py --model flux_reduced --resolution 512 --batch 1 --steps 2 --mixed-precision bf16

Each variant runs in its own process; peak memory is measured over the timed steps (resident set size on CPU,
sampled; torch.cuda.max_memory_allocated on GPU, reset after set-up)
on the same checkpoint and images:
  reference          diffusers' train_text_to_image_lora.py step (benchmarks/reference_diffusers_lora.py;
                     SDXL: train_text_to_image_lora_sdxl.py, benchmarks/reference_diffusers_lora_sdxl.py;
                     Flux: dreambooth/train_dreambooth_lora_flux.py, benchmarks/reference_diffusers_lora_flux.py):
                     attention LoRA rank 4, VAE encode and text encoder(s) every step
  ours (defaults)    lora-scripts as a user gets it: kohya preset rank 16, latent and text caches
  ours (equal)       the reference's settings: attention LoRA rank 4 = alpha, no caches
  ours (equal+cache) the reference's LoRA settings with our caches
Timing: mean seconds per optimizer step after warm-up (our figure includes data loading; the reference's
batches are prepared before its timed region, as the torchvision transforms are replaced). FLOPs of one step
by torch.utils.flop_counter; MFU = FLOP/s achieved / the measured fp32 (or bf16) matmul rate of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
VARIANTS = ("reference", "ours_defaults", "ours_equal", "ours_equal_cached")
_OURS = {"ours_defaults": {},
         "ours_equal": dict(lora_targets="attn", lora_rank=4, lora_alpha=4, cache_latents=False,
                            cache_text_encoder_outputs=False),
         "ours_equal_cached": dict(lora_targets="attn", lora_rank=4, lora_alpha=4)}


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakRSS:
    """Highest resident set size while training runs (sampled every 20 ms): ru_maxrss would report the
    model-loading peak instead, which is the same for both loops and hides what a training step costs."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * resource.getpagesize())
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def peak_rss_of_this_process() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _peak_bytes(device: str, rss: PeakRSS) -> float:
    return float(torch.cuda.max_memory_allocated()) if device == "cuda" else float(rss.peak)


def _count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def run_reference(args, ckpt: Path, data: Path) -> dict:
    import random

    from accelerate import Accelerator

    from lora_scripts.families.loading import load_base_model
    from reference_diffusers_lora import ReferenceLoop, reference_pixels

    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    model = load_base_model(ckpt)
    if args.model.endswith("sdxl"):
        from reference_diffusers_lora_sdxl import ReferenceSDXLLoop

        loop = ReferenceSDXLLoop(model, acc)
    elif args.model.startswith("flux"):
        from reference_diffusers_lora_flux import ReferenceFluxLoop

        loop = ReferenceFluxLoop(model, acc)
    else:
        loop = ReferenceLoop(model, acc)
    rng = random.Random(0)
    files = sorted(data.glob("*.png"))
    batches = []

    def ids(tokenizer, chunk):
        return tokenizer([f"a benchmark image {f.stem}" for f in chunk], max_length=tokenizer.model_max_length,
                         padding="max_length", truncation=True, return_tensors="pt").input_ids.to(acc.device)

    for i in range(0, len(files), args.batch):
        chunk = files[i : i + args.batch]
        pixels = torch.stack([reference_pixels(f, args.resolution, rng) for f in chunk]).to(acc.device)
        batch = {"pixel_values": pixels.contiguous().float(), "input_ids": ids(model.tokenizers["tokenizer"], chunk),
                 "prompts": [f"a benchmark image {f.stem}" for f in chunk]}
        if args.model.endswith("sdxl"):  # the example's collate: both tokenizers, each image's size and crop corner
            batch.update(input_ids_one=batch["input_ids"], input_ids_two=ids(model.tokenizers["tokenizer_2"], chunk),
                         original_sizes=[(args.resolution, args.resolution)] * len(chunk),
                         crop_top_lefts=[(0, 0)] * len(chunk))
        batches.append(batch)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for batch in batches[: args.warmup + args.steps]:
            t = time.perf_counter()
            loop.step(batch)
            _sync(args.device)
            times.append(time.perf_counter() - t)
    flops = _count_flops(lambda: loop.step(batches[0]))
    return _result(args, times, flops, None, _peak_bytes(args.device, rss))


def run_ours(args, variant: str, ckpt: Path, data: Path, tmp: Path) -> dict:
    from lora_scripts.config import validate_config
    from lora_scripts.training.trainer import Trainer

    cfg = dict(train_data_dir=data, metadata_path=data / "metadata.csv", base_model=ckpt, output_dir=tmp / variant,
               batch_size=args.batch, resolution=args.resolution, mixed_precision=args.mixed_precision,
               bucket_reso_steps=min(64, args.resolution), max_train_steps=10**6, verify_after_training=False)
    cfg.update(_OURS[variant])
    if args.model.startswith("flux") and cfg.get("lora_targets") == "attn":
        cfg["lora_targets"] = ["to_k", "to_q", "to_v", "to_out.0"]  # the Flux example's layers exactly
    t = time.perf_counter()
    trainer = Trainer(validate_config(cfg)).setup()  # includes filling the caches: a one-off cost, reported
    setup_s = time.perf_counter() - t
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.set_train_mode()
    times, it = [], iter(trainer.loader)
    first = None
    with PeakRSS() as rss:
        for step in range(args.warmup + args.steps):
            t = time.perf_counter()
            batch = next(it)
            first = first or batch
            trainer.micro_step(batch, step, 0)
            _sync(args.device)
            times.append(time.perf_counter() - t)
    flops = _count_flops(lambda: trainer.micro_step(first, 0, 0))
    return _result(args, times, flops, setup_s, _peak_bytes(args.device, rss))


def _result(args, times, flops, setup_s, peak) -> dict:
    timed = times[args.warmup :]
    s = sum(timed) / len(timed)
    # The whole worker's peak, loading included (what a 16-32 GB host must hold at its worst moment). VmHWM, not
    # ru_maxrss: Linux keeps ru_maxrss across exec, so a worker would report the parent's checkpoint build.
    maxrss = peak_rss_of_this_process()
    return {"s_per_step": s, "flops_per_step": flops, "flops_per_s": flops / s, "peak_bytes": peak, "setup_s": setup_s,
            "maxrss_bytes": maxrss}


def _mean_of_rounds(rounds: list[dict]) -> dict:
    s = sum(r["s_per_step"] for r in rounds) / len(rounds)
    flops = rounds[0]["flops_per_step"]
    return {"s_per_step": s, "flops_per_step": flops, "flops_per_s": flops / s,
            "peak_bytes": max(r["peak_bytes"] for r in rounds), "setup_s": rounds[0]["setup_s"],
            "maxrss_bytes": max(r["maxrss_bytes"] for r in rounds),
            "rounds_s_per_step": [r["s_per_step"] for r in rounds]}


def build_inputs(args, tmp: Path) -> tuple[Path, Path]:
    from step_time import build_checkpoint, make_data

    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(args.model, tmp)
    return ckpt, make_data(tmp / "data", args.batch * (args.steps + args.warmup),
                                                        args.resolution)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "tiny_sdxl", "sd15", "sdxl", "flux_reduced"], default="tiny")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times, order alternating")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpoint", help="use this checkpoint of --model's family instead of building a random one")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="run only these (the reference always runs: the ratios are against it)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        ckpt, data = (Path(x) for x in args.inputs.split(os.pathsep))
        with tempfile.TemporaryDirectory() as tmp:
            result = run_reference(args, ckpt, data) if args.worker == "reference" else \
                run_ours(args, args.worker, ckpt, data, Path(tmp))
        print("RESULT " + json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, data = build_inputs(args, Path(tmp))
        variants = [v for v in VARIANTS if v == "reference" or v in args.variants]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        # A shared machine's speed drifts over minutes: rounds alternate the order (ABCD, DCBA, ...) so that
        # drift falls on every variant alike, and each variant's figure is its mean over the rounds.
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                cmd = [sys.executable, __file__, "--worker", variant, "--inputs", f"{ckpt}{os.pathsep}{data}"] + \
                      [a for a in sys.argv[1:]]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[variant].append(json.loads(line[7:]))
                print(f"round {r + 1} {variant}: {runs[variant][-1]['s_per_step']:.3f} s/step", file=sys.stderr)
        results = {v: _mean_of_rounds(rs) for v, rs in runs.items()}
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    peak_rate = matmul_rate(args.device, dtype)
    ref = results["reference"]
    print(f"\n{args.model} {args.resolution}px batch {args.batch} on {args.device} ({torch.get_num_threads()} threads), "
          f"{args.mixed_precision}; matmul rate {peak_rate / 1e9:.1f} GFLOP/s")
    print(f"{args.rounds} round(s); s/step is the mean over rounds, peak memory the highest")
    print("| variant | s/step | steps/s vs reference | peak memory | vs reference | GFLOP/step | MFU | setup s | "
          "peak RSS incl. loading |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        setup = "" if r["setup_s"] is None else f"{r['setup_s']:.1f}"
        print(f"| {name} | {r['s_per_step']:.3f} | {ref['s_per_step'] / r['s_per_step']:.2f}x | "
              f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['peak_bytes'] / ref['peak_bytes']:.2f}x | "
              f"{r['flops_per_step'] / 1e9:.1f} | {r['flops_per_s'] / peak_rate:.1%} | "
              f"{setup} | {r['maxrss_bytes'] / 2**30:.2f} GiB |")
    print("JSON " + json.dumps({"args": vars(args), "matmul_rate": peak_rate, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
