"""How much of the learned LoRA update frozen-weight storage keeps, in one run: the tiny model of a family is
trained at full precision and with each base_weight_dtype, under each rule for which layers stay in the compute
dtype; the figure is the cosine of each run's learned update (up @ down x alpha/rank, every module) with the
full-precision run's (same data, seed and steps).

    python benchmarks/stored_update.py                      # tiny Flux.1, fp8 int8 nf4, three rules
    python benchmarks/stored_update.py --family sd15 --kinds fp8 nf4

Rules (Flux.1): `diffusers` = diffusers' layerwise-casting skip patterns (the adaLN modulation Linears match
`norm` and stay, the input embedders are stored); `kept` = the embedders and the modulation stay; `ours` =
Family.unstored_layers (the embedders stay, the modulation is stored). The SD families use diffusers' rule.
About 1 minute per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

STEPS = dict(max_train_steps=20, batch_size=2, learning_rate=1e-3, lora_rank=4, gradient_checkpointing=True,
             save_precision="fp32", resolution=32, seed=0)


def _update(path: Path) -> torch.Tensor:
    from lora_scripts.interop.lora_file import read_lora

    deltas = read_lora(path).deltas()
    return torch.cat([deltas[name].flatten() for name in sorted(deltas)])


def _base(family: str, root: Path) -> dict:
    from lora_scripts.families.tiny import write_tiny_checkpoint, write_tiny_flux_files

    if family == "flux1":
        return {k: str(v) for k, v in write_tiny_flux_files(root / "flux", seed=0).items()}
    return {"base_model": str(write_tiny_checkpoint(root / f"{family}.safetensors", seed=0, family=family))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="flux1", choices=["flux1", "sd15", "sd2", "sdxl"])
    parser.add_argument("--kinds", nargs="+", default=["fp8", "int8", "nf4"])
    args = parser.parse_args()

    from step_time import make_data  # the benchmarks' random images with a metadata.csv

    from lora_scripts.config import validate_config
    from lora_scripts.families import FAMILIES
    from lora_scripts.training.loop import train

    root = Path(tempfile.mkdtemp())
    data, base = make_data(root / "data", 8, 32), _base(args.family, root)

    def run(name: str, **settings) -> torch.Tensor:
        cfg = dict(train_data_dir=data, metadata_path=data / "metadata.csv", output_dir=root / "out" / name,
                   verify_after_training=False, **base, **STEPS, **settings)
        return _update(train(validate_config(cfg)).lora_path)

    family = FAMILIES[args.family]
    cls, ours = type(family), type(family).unstored_layers
    rules = {"ours": ours}
    if args.family == "flux1":
        rules = {"diffusers": lambda self, c: None,
                 "kept": lambda self, c: None if c != self.denoiser else ours(self, c) + ("norm",), **rules}
    full = run("full")
    print(f"| {family.label} base_weight_dtype | " + " | ".join(rules) + " |")
    print("|---" * (len(rules) + 1) + "|")
    try:
        for kind in args.kinds:
            cells = []
            for rule, method in rules.items():
                cls.unstored_layers = method
                stored = run(f"{kind}-{rule}", base_weight_dtype=kind)
                cells.append(f"{torch.nn.functional.cosine_similarity(full, stored, dim=0):.4f}")
            print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)
    finally:
        cls.unstored_layers = ours


if __name__ == "__main__":
    main()
