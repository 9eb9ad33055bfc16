"""The toy world's answer to issue 22's scenario: the demo's neon-lab LoRA drawn on given layouts through the
shipped toy canny ControlNet, as `lora-scripts generate --control canny:... --control-image LAYOUT` draws it.

Trains the demo LoRA (the demo's recipe, ~2 minutes on 2 cores), then writes docs/images/toy_control.png and
prints, per column, how often the shape lands where the layout puts it, the edge F1 against the layout's canny
map, and the neon pixel fraction (docs/toy_world.md's ControlNet table).

    python benchmarks/toy_control.py [--sheet docs/images/toy_control.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    from lora_scripts.config import load_config
    from lora_scripts.generation.sheets import contact_sheet
    from lora_scripts.toy.assets import toy_controlnet_asset
    from lora_scripts.toy.control_demo import PROMPT, control_report
    from lora_scripts.toy.demo import prepare_demo
    from lora_scripts.training.loop import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--sheet", default="docs/images/toy_control.png")
    parser.add_argument("--controlnet", type=Path, default=None, help="default: the shipped toy ControlNet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = load_config(prepare_demo(folder), {"output_dir": str(folder / "output" / "neon_lab"), "save_steps": 0})
        lora = train(config, overwrite=True).lora_path
        report = control_report(config.base_model, args.controlnet or toy_controlnet_asset(), config.name, lora,
                                folder / "layouts")
    footer = [f"prompt in every cell: {PROMPT}"] + [
        f"{label}: shape where the layout puts it {s['at_layout_position']:.2f}, edge F1 {s['edge_f1']:.2f}, "
        f"neon {s['neon_fraction']:.3f}" for label, s in report.stats.items()]
    sheet = contact_sheet(report.grid, report.rows, report.columns, cell=96,
                          title="neon_lab LoRA on given layouts: the toy canny ControlNet", footer=footer)
    sheet.save(args.sheet)
    print(json.dumps(report.stats, indent=2))
    print("| column | shape where the layout puts it | edge F1 | neon fraction |\n|---|---|---|---|")
    for label, s in report.stats.items():
        print(f"| {label} | {s['at_layout_position']:.2f} | {s['edge_f1']:.2f} | {s['neon_fraction']:.3f} |")
    print(f"sheet: {args.sheet}")


if __name__ == "__main__":
    main()
