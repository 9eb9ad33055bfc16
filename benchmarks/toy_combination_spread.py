"""How much the toy world's Lego-combination statistics move with the machine, to set the test's margins.

CPU kernels (vector width, thread count, reduction order) differ between processors, so the two toy LoRAs a test
trains are not the same bits everywhere, and neither are the images drawn with them. This trains the style and
subject LoRAs exactly as tests/test_toy_world.py does, in this process's kernel setting, and prints per seed the
neon fraction and arm probability of the base, of the combination (style 0.75 + subject 1), and of both at full
strength (style 1 + subject 1: the known weak spot, where the style LoRA redraws the subject as its own shapes on
many prompts; measured here rather than by a test that could only report it).

Run it under several settings, e.g.:
    OMP_NUM_THREADS=1 python benchmarks/toy_combination_spread.py
    OMP_NUM_THREADS=2 python benchmarks/toy_combination_spread.py
    ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 python benchmarks/toy_combination_spread.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(seeds=range(1, 13)) -> dict:
    from test_toy_world import COMBO_PROMPTS, toy_lora_configs

    from lora_scripts.toy.evaluate import Sampler
    from lora_scripts.toy.stats import arm_probability, neon_fraction, train_shape_classifier
    from lora_scripts.training.loop import train

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base, configs = toy_lora_configs(Path(tmp))
        loras = {name: train(cfg).lora_path for name, cfg in configs.items()}
        classifier = train_shape_classifier(seed=0)
        sampler = Sampler.open(base, loras)
        rows = {}
        for label, weights in (("base", {"neon_lab": 0.0, "robotic_arm": 0.0}),
                               ("combo", {"neon_lab": 0.75, "robotic_arm": 1.0}),
                               ("full", {"neon_lab": 1.0, "robotic_arm": 1.0})):
            per_seed = []
            for seed in seeds:
                ims = sampler.images(COMBO_PROMPTS, (seed,), weights)
                per_seed.append((round(neon_fraction(ims), 3), round(arm_probability(classifier, ims), 3)))
            rows[label] = per_seed
    return {"threads": torch.get_num_threads(), "capability": os.environ.get("ATEN_CPU_CAPABILITY", "default"),
            "cpu": torch.backends.cpu.get_cpu_capability(), "seconds": round(time.time() - started), **rows}


if __name__ == "__main__":
    print(json.dumps(main()))
