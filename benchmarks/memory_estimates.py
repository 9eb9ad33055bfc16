"""Every memory estimate the README and docs/benchmarks.md quote, from `check`'s estimator on the real configs
embedded in the package (meta device: no GPU, no weights; about a minute on 2 cores).

    python benchmarks/memory_estimates.py            # markdown tables on stdout

The estimates are of torch.cuda.max_memory_allocated (GB = GiB); the CUDA context comes on top in nvidia-smi.
benchmarks/gpu_suite.py measures the same settings on a GPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lora_scripts.config import validate_config
from lora_scripts.families import FAMILIES, FAMILY_KEY
from lora_scripts.training.memory import GB, estimate_memory, fitting_settings
from lora_scripts.training.step_costs import step_costs


BASE_DTYPES = ("auto", "fp8", "int8", "nf4")


def _config(folder: Path, **settings):
    return validate_config(dict(dict(train_data_dir=folder / "data", base_model=folder, output_dir=folder / "out",
                                     batch_size=1, lora_rank=16), **settings))


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    folder = Path(tempfile.mkdtemp())
    (folder / "data").mkdir()
    configs = {name: {**family.embedded_configs(), FAMILY_KEY: name} for name, family in FAMILIES.items()}

    print("## SD1.5, 512 px\n")
    print(_row("settings", "estimated peak", "weights", "activations", "LoRA+optimizer"))
    print(_row(*["---"] * 5))
    for label, kw in (("fp32", dict(mixed_precision="no")), ("fp16", dict(mixed_precision="fp16")),
                      ("fp16 + checkpointing", dict(mixed_precision="fp16", gradient_checkpointing=True)),
                      ("fp16, batch 4", dict(mixed_precision="fp16", batch_size=4))):
        e = estimate_memory(_config(folder, resolution=512, **kw), configs["sd15"])
        print(_row(label, _gb(e.total), _gb(e.weights), _gb(e.activations), _gb(e.lora)))

    print("\n## SDXL, 1024 px, bf16, caches\n")
    print(_row("batch", "gradient checkpointing", "text encoders trained", "estimated peak", "weights on the GPU",
               "activations"))
    print(_row(*["---"] * 6))
    for batch in (1, 4):
        for gc in (True, False):
            for te in (False, True):
                e = estimate_memory(_config(folder, resolution=1024, mixed_precision="bf16", batch_size=batch,
                                            gradient_checkpointing=gc, train_text_encoder=te), configs["sdxl"])
                print(_row(batch, "on" if gc else "off", "yes" if te else "no", _gb(e.total), _gb(e.weights),
                           _gb(e.activations)))

    print("\n## Network types, 1024 px, bf16 + checkpointing, rank 16, AdamW\n")
    print(_row("family", *(t for t in ("lora", "locon", "loha", "lokr", "dora")), "(LoRA+optimizer of each)"))
    print(_row(*["---"] * 7))
    for name in ("sdxl", "flux1"):
        totals, states = [], []
        for kind in ("lora", "locon", "loha", "lokr", "dora"):
            e = estimate_memory(_config(folder, resolution=1024, mixed_precision="bf16", gradient_checkpointing=True,
                                        network_type=kind), configs[name])
            totals.append(_gb(e.total))
            states.append(_gb(e.lora))
        print(_row(name, *totals, " / ".join(states)))

    print("\n## Frozen weights stored smaller, 1024 px, bf16 + checkpointing, no swap\n")
    print(_row("family", *BASE_DTYPES))
    print(_row(*["---"] * (len(BASE_DTYPES) + 1)))
    for name in ("sdxl", "flux1"):
        print(_row(name, *(_gb(estimate_memory(_config(folder, resolution=1024, mixed_precision="bf16",
                                                       gradient_checkpointing=True, base_weight_dtype=kind),
                                               configs[name]).total) for kind in BASE_DTYPES)))

    print("\n## `check --vram`: what each budget adds (1024 px, batch 1, rank 16, from fp32)\n")
    print(_row("family", "vram", "settings added", "estimated peak", "fits", "what each costs a step (counted)"))
    print(_row(*["---"] * 6))
    for name in ("sdxl", "flux1"):
        for vram in (6, 8, 10, 12):
            start = _config(folder, resolution=1024)
            changes, fitted, fits = fitting_settings(start, vram, configs[name])
            said = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())
            fitted_config = start.model_copy(update=changes)
            costs = step_costs(fitted_config, changes, estimate_memory(fitted_config, configs[name], flops=True))
            print(_row(name, vram, said, _gb(fitted.total), "yes" if fits else "no", "; ".join(costs)))


if __name__ == "__main__":
    main()
