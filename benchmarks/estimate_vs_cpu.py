"""`check`'s memory estimate against what a training step really allocates, measured on the CPU.

    python benchmarks/estimate_vs_cpu.py                      # every row (~25 min on 2 cores)
    python benchmarks/estimate_vs_cpu.py --rows sd15_512 --out /tmp/est
    python benchmarks/estimate_vs_cpu.py --reuse /tmp/est/estimate_vs_cpu.json   # the estimates again only

The estimate is of torch.cuda.max_memory_allocated, which needs a GPU. The same quantity exists on the CPU:
PyTorch's profiler (profile_memory) reports every allocation and free of the CPU allocator, so the peak a
training step adds on top of what was resident when it began is measured, not counted. Only the step is
compared this way: on the CPU everything the trainer would move off a GPU (the VAE, cached-out encoders) stays
in the same memory. Compared part by part, for the same config as `estimate_memory`:
  resident  the frozen weights the estimate puts on the device, the LoRA weights and the optimizer's state,
            read from the trainer's own tensors after set-up (so storage dtypes, targets and state are checked)
  step      the measured peak of one optimizer step above that (activations, gradients, backward temporaries,
            the optimizer's own temporaries), against the estimate's activations + transient + LoRA gradients
What differs from a GPU: the CPU's kernels (oneDNN convolutions, the CPU flash attention) allocate their own
temporaries; autograd saves the same tensors on both. Each row runs in its own process on the random-weight
models of benchmarks/step_time.py, the step timed being the third (the optimizer state exists by then).
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

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

GB = 1024**3
# row -> (model, overrides). bf16 autocast as on a GPU; caches on (the trainer's default).
ROWS = {
    "sd15_512": ("sd15", dict(resolution=512)),
    "sd15_512_ckpt": ("sd15", dict(resolution=512, gradient_checkpointing=True)),
    "sd15_512_b2_te": ("sd15", dict(resolution=512, batch_size=2, train_text_encoder=True)),
    "sd15_512_fp8": ("sd15", dict(resolution=512, gradient_checkpointing=True, base_weight_dtype="fp8")),
    "sd15_512_loha": ("sd15", dict(resolution=512, gradient_checkpointing=True, network_type="loha")),
    "sdxl_1024_ckpt": ("sdxl", dict(resolution=1024, gradient_checkpointing=True)),
    "flux_512_ckpt": ("flux_reduced", dict(resolution=512, gradient_checkpointing=True)),
    "flux_512_fp8": ("flux_reduced", dict(resolution=512, gradient_checkpointing=True, base_weight_dtype="fp8")),
}
TINY = {"sd15": "tiny", "sdxl": "tiny_sdxl", "flux_reduced": "tiny_flux"}


def allocation_peak(run) -> tuple[float, object]:
    """(the largest amount `run` held allocated at once above what was allocated when it began, in bytes; its
    result), from the CPU allocator's events as the profiler records them. A free of memory allocated before
    the profiler started is not reported, so the figure can only err high, never miss an allocation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return float(peak), result


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def resident(trainer) -> dict:
    """What the estimate counts as resident on the device during the steps, read from the trainer's tensors."""
    from lora_scripts.data.cache import offload_plan
    from lora_scripts.training.adapters import is_adapter_param

    cfg, model = trainer.config, trainer.model
    family = model.family
    vae_off, text_off = offload_plan(cfg)
    frozen, lora = 0, 0
    for name, module in model.modules.items():
        if name == family.autoencoder and vae_off or text_off and name in family.text_encoders \
                and name not in family.trainable(cfg.train_text_encoder):
            continue
        for path, p in module.named_parameters():
            if is_adapter_param(path):
                lora += p.numel() * p.element_size()
            else:
                frozen += p.numel() * p.element_size()
    state = _bytes(t for s in trainer.optimizer.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"weights": frozen, "lora": lora, "optimizer_state": state}


def measure(name: str, inputs: dict, tiny: bool) -> dict:
    """The row's config trained for three steps on the CPU: what is resident after set-up, the third step's
    allocation peak above it (bytes)."""
    import gc

    from gpu_suite import _steps

    from lora_scripts.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_row_config(name, inputs, tiny, Path(tmp))).setup()
        _steps(trainer, 2)  # the optimizer's state exists from here on, as it does in every later step
        gc.collect()
        held = resident(trainer)
        started = time.perf_counter()
        step, _ = allocation_peak(lambda: _steps(trainer, 1))
        return {**held, "step": step, "seconds": time.perf_counter() - started}


def _row_config(name: str, inputs: dict, tiny: bool, folder: Path):
    from gpu_suite import _config

    model, overrides = ROWS[name]
    return _config(model, inputs, tiny, folder, **{**overrides, "mixed_precision": "bf16"})


def _real_configs(model: str) -> dict:
    """The component configs of a row's random-weight model (what its files say), without the files."""
    from step_time import reduce_flux

    from lora_scripts.families import FAMILIES, FAMILY_KEY

    family = {"sd15": "sd15", "sdxl": "sdxl", "flux_reduced": "flux1"}[model]
    configs = {**FAMILIES[family].embedded_configs(), FAMILY_KEY: family}
    if model == "flux_reduced":  # as step_time.build_flux_reduced writes it
        reduce_flux(configs)
    return configs


def compare(name: str, measured: dict, tiny: bool, inputs: dict | None = None) -> dict:
    """The row's estimates (CPU autocast rules, as the measured run; CUDA's for the record) against `measured`.
    inputs: the built models (their files give the configs); None: the configs the files were written from."""
    from lora_scripts.training.memory import estimate_memory
    from lora_scripts.training.optimizers import SPECS

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if inputs is None:  # a config that validates, with the configs given directly
            size = ROWS[name][1]["resolution"]
            (folder / f"data_{size}").mkdir()
            (folder / f"data_{size}" / "metadata.csv").write_text("file_name,text\n")
            (folder / "base").mkdir()
            inputs, configs = {f"data_{size}": str(folder / f"data_{size}"), ROWS[name][0]: str(folder / "base")}, \
                _real_configs(ROWS[name][0])
        else:
            configs = None
        cfg = _row_config(name, inputs, tiny, folder)
        estimate = estimate_memory(cfg, configs, autocast="cpu")
        on_gpu = estimate_memory(cfg, configs)
    grads = estimate.lora / (8 + SPECS[cfg.optimizer].state_bytes) * 4  # fp32 weights + grads + state per param
    est_step = estimate.activations + estimate.transient + grads  # the gradients appear in the step
    # The steps' peak (the caching phase before them is not measured here; latents are cached: no VAE encode).
    est_total = estimate.weights + estimate.lora + estimate.activations + estimate.transient
    measured_total = measured["weights"] + measured["lora"] + measured["optimizer_state"] + measured["step"]
    return {
        "row": name, "config": ROWS[name][1], "seconds_profiled_step": round(measured["seconds"], 1),
        "estimate_gb": round(est_total / GB, 3), "measured_gb": round(measured_total / GB, 3),
        "ratio": round(est_total / measured_total, 3),
        "step": {"estimate_gb": round(est_step / GB, 3), "measured_gb": round(measured["step"] / GB, 3),
                 "ratio": round(est_step / measured["step"], 3)},
        "weights": {"estimate_gb": round(estimate.weights / GB, 3), "measured_gb": round(measured["weights"] / GB, 3)},
        "lora_and_state": {"estimate_gb": round((estimate.lora - grads) / GB, 3),
                           "measured_gb": round((measured["lora"] + measured["optimizer_state"]) / GB, 3)},
        "estimate_parts_gb": estimate.as_dict()["parts_gb"],
        "cuda_rules_gb": round((on_gpu.weights + on_gpu.lora + on_gpu.activations + on_gpu.transient) / GB, 3),
        "measured": measured,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", type=Path, default=None, help="folder for estimate_vs_cpu.json")
    parser.add_argument("--tiny", action="store_true", help="the tiny models (a dry run in seconds)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="an earlier run's estimate_vs_cpu.json: estimate again, measure nothing (seconds)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # one row, in its own process
        inputs = json.loads(args.inputs)
        print("RESULT " + json.dumps(compare(args.row, measure(args.row, inputs, args.tiny), args.tiny, inputs)))
        return 0
    if args.reuse:  # the estimates again, against the measurements of an earlier run (they do not change)
        earlier = {r["row"]: r for r in json.loads(args.reuse.read_text()) if "measured" in r}
        results = [compare(name, earlier[name]["measured"], False) for name in args.rows if name in earlier]
        return _report(results, args.out)
    from gpu_suite import build_inputs

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {ROWS[r][0] for r in args.rows}  # build_inputs reads the models it builds from gpu_suite's row names
        inputs = build_inputs(args.tiny, Path(tmp), ["memory_sdxl"] * ("sdxl" in models)
                              + ["memory_flux_swap"] * ("flux_reduced" in models))
        for name in args.rows:
            cmd = [sys.executable, __file__, "--row", name, "--inputs", json.dumps(inputs)] + \
                (["--tiny"] if args.tiny else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            result = json.loads(line[7:]) if line else {"row": name, "error": out.stderr[-2000:]}
            results.append(result)
            print(json.dumps(result), flush=True)
    return _report(results, args.out)


def _report(results: list[dict], out: Path | None) -> int:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "estimate_vs_cpu.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0 if all("error" not in r for r in results) else 1


def table(results: list[dict]) -> str:
    lines = ["| row | estimate | measured | ratio | step: estimate | step: measured | step ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed | | | | | |")
            continue
        s = r["step"]
        lines.append(f"| {r['row']} | {r['estimate_gb']:.2f} GB | {r['measured_gb']:.2f} GB | {r['ratio']:.2f} | "
                     f"{s['estimate_gb']:.2f} GB | {s['measured_gb']:.2f} GB | {s['ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
