"""Host RAM needed to load a base model for training: loaded in fp32 and then cast to the training dtype (what
lora-scripts did before issue 18) against read straight in the training dtype (LoadSettings.dtype, what the
trainer does now). Each way runs in its own process; the figure is that process's peak resident set (VmHWM).

    python benchmarks/load_memory.py --model sdxl --dtype bf16
    python benchmarks/load_memory.py --checkpoint sd_xl_base_1.0.safetensors --dtype fp16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(checkpoint: Path, way: str, dtype: torch.dtype) -> dict:
    from lora_scripts.families import LoadSettings
    from lora_scripts.families.loading import load_base_model

    t = time.perf_counter()
    if way == "fp32_then_cast":
        model = load_base_model(checkpoint)
        for name, module in model.modules.items():
            module.to(dtype if name != model.family.autoencoder else torch.float32)
    else:
        model = load_base_model(checkpoint, LoadSettings(dtype=dtype))
        model.vae.to(torch.float32)
    params = sum(p.numel() for m in model.modules.values() for p in m.parameters())
    return {"way": way, "seconds": time.perf_counter() - t, "peak_rss_bytes": _peak_rss(), "parameters": params}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "tiny_sdxl", "sd15", "sdxl"], default="sdxl")
    p.add_argument("--checkpoint", help="a real checkpoint instead of a random one of --model's architecture")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(Path(args.checkpoint), args.worker, DTYPES[args.dtype])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            from step_time import build_checkpoint

            ckpt = build_checkpoint(args.model, Path(tmp))
        rows = []
        for way in ("fp32_then_cast", "training_dtype"):
            out = subprocess.run([sys.executable, __file__, "--worker", way, "--checkpoint", str(ckpt),
                                  "--dtype", args.dtype], capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[7:]))
        size = ckpt.stat().st_size
    print(f"{args.checkpoint or args.model} ({size / 2**30:.2f} GiB file, {rows[0]['parameters'] / 1e9:.3f} B "
          f"parameters), training dtype {args.dtype}")
    print("| loading | peak RSS | s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['seconds']:.1f} |")
    print("JSON " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
