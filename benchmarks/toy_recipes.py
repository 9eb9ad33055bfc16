"""The demo's neon-lab LoRA trained with each optimizer (and any other recipe) at its recommended settings, on
the toy world: what each one learns, as docs/toy_world.md's recipe table reports it.

Every row trains on the demo's 60 images from the same seed and is read the way the demo reads its own LoRA
(toy/demo.py style_report: 2 prompts x 2 seeds at strengths 0, 0.5, 1): neon pixel fraction and palette
distance to the training set (0 = the same colours). Held-out loss: 24 fresh images from the same generator
(another seed) as validation_dir, at the end of the run. Also file size and seconds per step.

    python benchmarks/toy_recipes.py                 # every row (optimizers, then network types)
    python benchmarks/toy_recipes.py adamw prodigy   # some rows
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

# Every row starts from the demo's YAML (rank 8, batch 8, 320 steps) with the first demo recipe put back (plain
# LoRA, AdamW 1e-3): the rows below were measured against it, before the demo itself moved to LoCon + Lion.
BASELINE = {"network_type": "lora", "optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.01}
# name -> config overrides on top of BASELINE
RECIPES: dict[str, dict] = {
    "adamw": {},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0},
    "lion": {"optimizer": "lion", "learning_rate": 1e-4, "weight_decay": 0.1},
    "adafactor": {"optimizer": "adafactor"},
    "adamw_schedulefree": {"optimizer": "adamw_schedulefree", "lr_warmup_steps": 32},
    # network types at the demo's AdamW settings (LoHa at rank 4: about LoRA rank 8's parameter count)
    "locon": {"network_type": "locon"},
    "loha": {"network_type": "loha", "lora_rank": 4},
    "lokr": {"network_type": "lokr"},
    "dora": {"network_type": "dora"},
    # the learning-rate sweep for a recipe whose strength 1.0 is the closest to the training set
    "adamw_2e-4": {"learning_rate": 2e-4},
    "adamw_5e-4": {"learning_rate": 5e-4},
    "adamw_160_steps": {"max_train_steps": 160},
    "locon_3e-4": {"network_type": "locon", "learning_rate": 3e-4},
    "locon_5e-4": {"network_type": "locon", "learning_rate": 5e-4},
    "lion_3e-5": {"optimizer": "lion", "learning_rate": 3e-5, "weight_decay": 0.1},
    "lion_3e-4": {"optimizer": "lion", "learning_rate": 3e-4, "weight_decay": 0.1},
    "locon_lion_1e-4": {"network_type": "locon", "optimizer": "lion", "learning_rate": 1e-4, "weight_decay": 0.1},
    # the same two recipes from another training seed: is the difference the recipe's?
    "adamw_seed1": {"seed": 1},
    "locon_lion_1e-4_seed1": {"network_type": "locon", "optimizer": "lion", "learning_rate": 1e-4, "weight_decay": 0.1,
                              "seed": 1},
    # the demo's YAML as it is
    "demo": {"network_type": "locon", "optimizer": "lion", "learning_rate": 1e-4, "weight_decay": 0.1},
}

CFG = 5.0  # the guidance the demo's sheet is drawn with; --cfg X draws the rows at another


def run(name: str, overrides: dict, folder: Path, held_out: Path) -> dict:
    from lora_scripts.config import load_config
    from lora_scripts.toy.demo import DEMO_CONFIG, style_report
    from lora_scripts.training.loop import train

    config = load_config(folder / DEMO_CONFIG, {"output_dir": str(folder / "output" / name), "validation_dir": str(held_out),
                                                "save_steps": 0, **BASELINE, **overrides})
    started = time.time()
    result = train(config, overwrite=True)
    seconds = time.time() - started
    _, stats = style_report(config.base_model, result.lora_path, config.name, cfg=CFG)
    return {"recipe": name, "overrides": overrides, "cfg": CFG, "steps": result.steps, "s_per_step": seconds / result.steps,
            "held_out_loss": result.validation[-1][1], "file_kb": result.lora_path.stat().st_size / 1024,
            **{f"neon_{w}": stats[f"strength_{w}"]["neon_fraction"] for w in (0.0, 0.5, 1.0)},
            **{f"distance_{w}": stats[f"strength_{w}"]["style_distance"] for w in (0.0, 0.5, 1.0)},
            "training_set_neon": stats["training_set"]["neon_fraction"]}


def table(rows: list[dict]) -> str:
    out = ["| recipe | neon 0.5 / 1.0 | palette distance 0 / 0.5 / 1.0 | held-out loss | file | s/step |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['recipe']} | {r['neon_0.5']:.3f} / {r['neon_1.0']:.3f} | {r['distance_0.0']:.2f} / "
                   f"{r['distance_0.5']:.2f} / {r['distance_1.0']:.2f} | {r['held_out_loss']:.4f} | "
                   f"{r['file_kb']:.0f} KB | {r['s_per_step']:.3f} |")
    return "\n".join(out)


def main(names: list[str]) -> list[dict]:
    from lora_scripts.toy.demo import prepare_demo
    from lora_scripts.toy.scenes import write_neon_set

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare_demo(folder)
        held_out = folder / "data" / "neon_held_out"
        write_neon_set(held_out, count=24, size=32, seed=1)
        for name in names:
            rows.append(run(name, RECIPES[name], folder, held_out))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--cfg" in args:
        i = args.index("--cfg")
        CFG = float(args[i + 1])
        del args[i:i + 2]
    main(args or list(RECIPES))
