"""Every GPU figure issue 23 asks for, in one call that ends within its budget (7.5 minutes by default) on one
H100/H200, and the same code on tiny models on CPU (--tiny, seconds; tests/test_gpu_suite.py runs it in CI).

    python benchmarks/gpu_suite.py --out OUT                 # on the GPU
    python benchmarks/gpu_suite.py --tiny --out /tmp/suite   # dry run here

Rows (each in its own process with its own time limit, so one failure or overrun costs only its row; what
failed is recorded with the end of its traceback):
  step_sd15, step_sdxl  our step against the diffusers example's step on the same random-weight model
                        (benchmarks/train_step.py: s/step, peak allocated, MFU against this GPU's own measured
                        bf16 matmul rate); SD1.5-sized at 512 px batch 1 and 8, SDXL-sized at 1024 px batch 1
  memory_*              torch.cuda.max_memory_allocated over three training steps against `check`'s estimate
                        for the same config (goal: within 15 %): SD1.5 512 bf16 with and without gradient
                        checkpointing, SDXL 1024 bf16 + checkpointing + caches (target <= 7 GB), the same with fp8
                        frozen weights, and Flux.1 at its real widths with 2+4 blocks, fp8 + block swap
  fp16_scaler           50 steps of SD1.5 512 under fp16 with the GradScaler: its scale, skipped steps, losses
  bf16_vs_fp32          the learned update of 30 steps in bf16 against fp32 from the same seed (cosine >= 0.99)
  compile               torch.compile (inductor): first-step (compile) time and steady s/step against eager
  selftest_fp16         train() with its end-of-run self-test and an fp16 preview (not black), on the GPU
Writes OUT/gpu_suite.json and OUT/gpu_suite.md and prints the table last.

On the device machine the image has torch, transformers, peft and accelerate but not diffusers or pydantic:
benchmarks/gpu_wheels.sh downloads the wheels that travel with the call (see its header for the command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

# name -> (seconds allowed on the GPU, what it measures). The budgets add up to the suite's limit.
ROWS = {
    "step_sd15": (75, "SD1.5 512 b1 bf16: ours vs the diffusers example"),
    "step_sd15_b8": (60, "SD1.5 512 b8 bf16: ours vs the diffusers example"),
    "step_sdxl": (110, "SDXL 1024 b1 bf16: ours vs the diffusers example"),
    "memory_sd15": (20, "SD1.5 512 b1 bf16: peak vs estimate"),
    "memory_sd15_ckpt": (20, "SD1.5 512 b1 bf16 + checkpointing: peak vs estimate"),
    "memory_sdxl": (30, "SDXL 1024 b1 bf16 + checkpointing + caches: peak vs estimate (target <= 7 GB)"),
    "memory_sdxl_fp8": (30, "the same with fp8 frozen weights (target <= 6 GB)"),
    "memory_flux_swap": (30, "Flux.1 2+4 blocks 1024 b1 fp8 + block swap: peak vs estimate"),
    "fp16_scaler": (30, "SD1.5 512 fp16 + GradScaler, 50 steps"),
    "bf16_vs_fp32": (30, "SD1.5 256: learned update bf16 vs fp32 (cosine)"),
    "compile": (90, "SD1.5 512 b1 bf16: torch.compile first step and steady speed-up"),
    # last: rows run in order and are written as they end, so a suite over the device's limit loses only this one
    "selftest_fp16": (30, "SD1.5 256 fp16, 3 steps: the end-of-run self-test on the GPU, and an fp16 preview"),
}
MEMORY = {  # row -> (model, overrides of the config)
    "memory_sd15": ("sd15", dict(resolution=512)),
    "memory_sd15_ckpt": ("sd15", dict(resolution=512, gradient_checkpointing=True)),
    "memory_sdxl": ("sdxl", dict(resolution=1024, gradient_checkpointing=True)),
    "memory_sdxl_fp8": ("sdxl", dict(resolution=1024, gradient_checkpointing=True, base_weight_dtype="fp8",
                                     text_encoder_weight_dtype="fp8")),
    "memory_flux_swap": ("flux_reduced", dict(resolution=1024, gradient_checkpointing=True, base_weight_dtype="fp8",
                                              text_encoder_weight_dtype="fp8", offload="blocks:4")),
}
TINY_MODEL = {"sd15": "tiny", "sdxl": "tiny_sdxl", "flux_reduced": "tiny_flux"}


# --- the parent: inputs once, every row in its own process ---------------------------------------------------
def build_inputs(tiny: bool, folder: Path, rows: list[str]) -> dict[str, str]:
    """Checkpoints the rows need, built once with random weights; images for every resolution used."""
    from step_time import build_checkpoint, make_data

    models = {"sd15"} | ({"sdxl"} if any("sdxl" in r for r in rows) else set()) | \
        ({"flux_reduced"} if "memory_flux_swap" in rows else set())
    out = {}
    for model in sorted(models):
        if tiny and model == "flux_reduced":
            from lora_scripts.families.tiny import write_tiny_flux_files

            files = write_tiny_flux_files(folder / "flux")
            out[model] = json.dumps({k: str(v) for k, v in files.items()})
        else:
            out[model] = str(build_checkpoint(TINY_MODEL[model] if tiny else model, folder))
    for size in (32, 64) if tiny else (256, 512, 1024):
        out[f"data_{size}"] = str(make_data(folder / f"data_{size}", 16, size))
    return out


def _function(name: str):
    return ROW_FUNCTIONS["memory" if name.startswith("memory_") else name]


def run_row(name: str, inputs: dict, args) -> dict:
    if args.tiny:  # CPU dry run: in this process (the GPU run isolates rows for their peaks and their failures)
        started = time.time()
        try:
            result = json.loads(json.dumps(_function(name)(name, inputs, True), default=float))
        except Exception:
            return {"row": name, "ok": False, "error": "exception", "log": traceback.format_exc()[-3000:]}
        return {"row": name, "ok": True, "seconds": round(time.time() - started, 1), **result}
    budget = ROWS[name][0]
    cmd = [sys.executable, __file__, "--row", name, "--inputs", json.dumps(inputs)] + (["--tiny"] if args.tiny else [])
    started = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-1500:]
        return {"row": name, "ok": False, "error": f"over its {budget} s budget", "log": str(tail)}
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        return {"row": name, "ok": False, "error": f"exit {out.returncode}", "log": out.stderr[-3000:]}
    return {"row": name, "ok": True, "seconds": round(time.time() - started, 1), **json.loads(line[7:])}


def environment() -> dict:
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": "cpu"}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    for package in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = None
    return env


def markdown(results: list[dict], env: dict, command: str) -> str:
    lines = [f"GPU suite on {env['device']} (driver {env.get('driver', '-')}, CUDA {env.get('cuda', '-')}, torch "
             f"{env['torch']}, diffusers {env['diffusers']}); command: `{command}`", "",
             "| row | what | result |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {ROWS[r['row']][1]} | {summary(r)} |")
    return "\n".join(lines)


def summary(r: dict) -> str:
    if not r["ok"]:
        return f"FAILED ({r['error']})"
    if "variants" in r:
        ref = r["variants"]["reference"]
        parts = [f"{v}: {x['s_per_step']:.3f} s/step ({ref['s_per_step'] / x['s_per_step']:.2f}x), "
                 f"{x['peak_bytes'] / 2**30:.2f} GiB, MFU {x['mfu']:.1%}" for v, x in r["variants"].items()]
        return "; ".join(parts)
    if "peak_gb" in r:
        measured = "not measured (CPU)" if r["peak_gb"] is None else f"{r['peak_gb']:.2f} GB"
        ratio = "" if r["peak_gb"] is None else f", estimate/measured {r['estimate_gb'] / r['peak_gb']:.2f}"
        return f"peak {measured}, estimate {r['estimate_gb']:.2f} GB{ratio}, {r['s_per_step']:.3f} s/step"
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                     if k not in ("row", "ok", "seconds") and not isinstance(v, (list, dict)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: the dry run CI does")
    p.add_argument("--out", default="gpu_suite_out")
    p.add_argument("--rows", nargs="*", choices=list(ROWS), help="only these rows")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:  # a worker: one row, its result as one line
        try:
            result = _function(args.row)(args.row, json.loads(args.inputs), args.tiny)
        except Exception:
            traceback.print_exc()
            return 1
        print("RESULT " + json.dumps(result, default=float))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = args.rows or list(ROWS)
    env = environment()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        inputs = build_inputs(args.tiny, Path(tmp), rows)
        env["inputs_s"] = round(time.time() - started, 1)
        for name in rows:
            results.append(run_row(name, inputs, args))
            print(f"{name}: {summary(results[-1])}", file=sys.stderr, flush=True)
            (out / "gpu_suite.json").write_text(json.dumps({"environment": env, "rows": results}, indent=2))
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:])
    table = markdown(results, env, command)
    (out / "gpu_suite.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["ok"] for r in results) else 1


# --- the rows --------------------------------------------------------------------------------------------------
def _device(tiny: bool) -> str:
    return "cpu" if tiny or not torch.cuda.is_available() else "cuda"


def row_step(name: str, inputs: dict, tiny: bool) -> dict:
    """benchmarks/train_step.py on the suite's checkpoint: the four variants, their s/step, peak and MFU."""
    model = "sdxl" if name == "step_sdxl" else "sd15"
    batch = 8 if name.endswith("_b8") else 1
    res = 1024 if model == "sdxl" else 512
    cmd = [sys.executable, str(HERE / "train_step.py"), "--model", TINY_MODEL[model] if tiny else model,
           "--checkpoint", inputs[model], "--resolution", str((64 if model == "sdxl" else 32) if tiny else res), "--batch", str(2 if tiny else batch),
           "--steps", "1" if tiny else "3", "--device", _device(tiny), "--mixed-precision", "no" if tiny else "bf16"]
    if tiny:  # the dry run: the reference and our default step (the other two are our step with other settings)
        cmd += ["--variants", "ours_defaults"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("JSON ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    data = json.loads(line[5:])
    rate = data["matmul_rate"]
    return {"matmul_tflops": rate / 1e12,
            "variants": {v: {**r, "mfu": r["flops_per_s"] / rate} for v, r in data["results"].items()}}


def _config(model: str, inputs: dict, tiny: bool, folder: Path, **overrides):
    from lora_scripts.config import validate_config

    size = (64 if model == "sdxl" else 32) if tiny else overrides.get("resolution", 512)  # tiny SDXL: 3 levels
    data = Path(inputs[f"data_{size}"])
    cfg = dict(train_data_dir=data, metadata_path=data / "metadata.csv", output_dir=folder / "out", batch_size=1,
               mixed_precision="no" if tiny else "bf16", bucket_reso_steps=min(64, size), max_train_steps=10**6,
               verify_after_training=False, seed=0)
    if model == "flux_reduced" and tiny:
        files = json.loads(inputs[model])
        cfg.update(base_model=files.pop("base_model"), **files)
    else:
        cfg["base_model"] = inputs[model]
    cfg.update(overrides)
    if tiny:
        cfg["resolution"] = size  # fp8 storage then computes in fp32: the same code path
    return validate_config(cfg)


def _steps(trainer, n: int) -> tuple[list[float], list[float]]:
    """n optimizer steps (batch after batch, round the loader): seconds and losses of each."""
    device = trainer.accelerator.device.type
    times, losses = [], []
    it = iter(trainer.loader)
    trainer.set_train_mode()
    for step in range(n):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(trainer.loader)
            batch = next(it)
        t = time.perf_counter()
        losses.append(float(trainer.micro_step(batch, step, 0)))
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times, losses


def row_memory(name: str, inputs: dict, tiny: bool) -> dict:
    from lora_scripts.training.memory import estimate_memory
    from lora_scripts.training.trainer import Trainer

    model, overrides = MEMORY[name]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(model, inputs, tiny, Path(tmp), **overrides)
        estimate = estimate_memory(cfg)
        trainer = Trainer(cfg).setup()
        cuda = trainer.accelerator.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, losses = _steps(trainer, 3)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"peak_gb": peak, "estimate_gb": estimate.total_gb, "estimate_parts": estimate.as_dict()["parts_gb"],
            "s_per_step": sum(times[1:]) / max(1, len(times) - 1), "loss": losses[-1], "config": overrides}


def row_fp16_scaler(name: str, inputs: dict, tiny: bool) -> dict:
    from lora_scripts.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config("sd15", inputs, tiny, Path(tmp), resolution=512, mixed_precision="no" if tiny else "fp16")
        trainer = Trainer(cfg).setup()
        scales, skipped, losses = [], 0, []
        for i in range(3 if tiny else 50):
            _, loss = _steps(trainer, 1)
            losses += loss
            scaler = trainer.accelerator.scaler
            scales.append(float(scaler.get_scale()) if scaler is not None else None)
            skipped += not trainer.grads_finite
    finite = [x for x in losses if x == x and abs(x) != float("inf")]
    return {"steps": len(losses), "finite_losses": len(finite), "skipped_steps": skipped,
            "final_scale": scales[-1], "first_scale": scales[0], "mean_loss": sum(finite) / max(1, len(finite))}


def row_bf16_vs_fp32(name: str, inputs: dict, tiny: bool) -> dict:
    from lora_scripts.training.trainer import Trainer

    updates = {}
    for precision in ("no", "no" if tiny else "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _config("sd15", inputs, tiny, Path(tmp), resolution=256, mixed_precision=precision,
                          learning_rate=1e-3)
            trainer = Trainer(cfg).setup()
            _steps(trainer, 3 if tiny else 30)
            updates[len(updates)] = _update(trainer.lora_states())
    cosine = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0)
    return {"cosine": float(cosine), "update_norm_fp32": float(updates[0].norm())}


def _update(states: dict) -> torch.Tensor:
    """Every LoRA module's B @ A, concatenated (alpha = rank in these configs)."""
    parts = []
    for state in states.values():
        for key in sorted(k for k in state if k.endswith("lora_A.weight")):
            a = state[key].float().flatten(1)
            b = state[key.replace("lora_A", "lora_B")].float().flatten(1)
            parts.append((b @ a).flatten().cpu())
    return torch.cat(parts)


def row_compile(name: str, inputs: dict, tiny: bool) -> dict:
    from lora_scripts.training.trainer import Trainer

    out = {}
    for compiled in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = _config("sd15", inputs, tiny, Path(tmp), resolution=512, torch_compile=compiled and not tiny)
            trainer = Trainer(cfg).setup()
            times, _ = _steps(trainer, 2 if tiny else 6)
            key = "compiled" if compiled else "eager"
            out[f"{key}_first_s"] = times[0]
            out[f"{key}_s_per_step"] = sum(times[1:]) / len(times[1:])
    out["speedup"] = out["eager_s_per_step"] / out["compiled_s_per_step"]
    return out


def row_selftest_fp16(name: str, inputs: dict, tiny: bool) -> dict:
    """train() as users run it, on the GPU: the self-test compares the loaded adapter with the file (found broken
    by review: device mismatch), and the preview is drawn under fp16 autocast with the VAE kept fp32 (NaN gives a
    black image: its mean brightness says)."""
    from PIL import Image, ImageStat

    from lora_scripts.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config("sd15", inputs, tiny, Path(tmp), resolution=256, mixed_precision="no" if tiny else "fp16",
                      max_train_steps=3, verify_after_training=True, sample_prompts=["a photo of a lab"],
                      sample_every_n_steps=3)
        result = train(cfg)
        preview = next((result.output_dir / "samples").glob("*.png"))
        with Image.open(preview) as im:
            brightness = ImageStat.Stat(im.convert("L")).mean[0]
    return {"verified": bool(result.verified and "0 unmatched keys" in result.verified),
            "preview_brightness": brightness, "preview_black": brightness < 1.0}


ROW_FUNCTIONS = {"step_sd15": row_step, "step_sd15_b8": row_step, "step_sdxl": row_step, "memory": row_memory,
                 "fp16_scaler": row_fp16_scaler, "bf16_vs_fp32": row_bf16_vs_fp32, "compile": row_compile,
                 "selftest_fp16": row_selftest_fp16}

if __name__ == "__main__":
    sys.exit(main())
