"""`lora-scripts generate`: images from prompts with <lora:NAME:W> tags, single images or a strength sweep."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import LoraScriptsError


def parse_size(text: str) -> tuple[int, int]:
    m = text.lower().split("x")
    try:
        w, h = int(m[0]), int(m[1] if len(m) > 1 else m[0])
    except (ValueError, IndexError):
        raise LoraScriptsError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    if w % 8 or h % 8:
        raise LoraScriptsError(f"--size {text}: both sides must be multiples of 8 (the VAE works in 8-pixel cells)")
    return w, h


def parse_strengths(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LoraScriptsError(f"--sweep {text!r}: expected numbers separated by commas, e.g. 0,0.4,0.6,0.8,1") from None


def _next_index(out: Path) -> int:
    """Continue numbering after the images already there: a second run never overwrites the first."""
    taken = [int(p.name.split("-")[0]) for p in out.glob("[0-9]*-*.png") if p.name.split("-")[0].isdigit()]
    return max(taken, default=-1) + 1


def cmd_generate(args: argparse.Namespace) -> int:
    from .pnginfo import save_png
    from .render import Renderer, Settings
    from .sweeps import strength_sweep

    settings = Settings(steps=args.steps, cfg=args.cfg, scheduler=args.scheduler,
                        size=parse_size(args.size) if args.size else None, negative=args.negative or "")
    dirs = [Path(d) for d in args.lora_dir] if args.lora_dir else None
    renderer = Renderer(Path(args.base), dirs, settings) if dirs else Renderer(Path(args.base), settings=settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(args.n)]
    index = _next_index(out)
    if args.sweep:
        sheet, results = strength_sweep(renderer, args.prompt, seeds, parse_strengths(args.sweep))
        sheet_path = out / f"{index:05d}-sweep.png"
        sheet.save(sheet_path)
        index += 1
    else:
        results = [r for p in args.prompt for r in renderer.render(p, seeds)]
    written = []
    for r in results:
        written.append(save_png(r.image, out / f"{index:05d}-{r.params.seed}.png", r.params))
        index += 1
    print(f"wrote {len(written)} images to {out}" + (f"; sweep sheet: {sheet_path}" if args.sweep else ""))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import image_grid, read_run, table_markdown, write_comparison
    from .render import Renderer, Settings

    runs = [read_run(Path(d), args.step) for d in args.runs]
    bases = {str(r.config.get("base_model")) for r in runs}
    if not args.base and len(bases) > 1:
        raise LoraScriptsError(f"the runs used different base models ({', '.join(sorted(bases))}); pick one with --base")
    base = Path(args.base or bases.pop())
    settings = Settings(steps=args.steps, cfg=args.cfg, scheduler=args.scheduler,
                        size=parse_size(args.size) if args.size else None, negative=args.negative or "")
    renderer = Renderer(base, [], settings)
    sheet = image_grid(renderer, runs, args.prompt, [args.seed + i for i in range(args.n)], args.weight)
    paths = write_comparison(Path(args.out), sheet, runs)
    print(table_markdown(runs))
    print(f"images: {paths['sheet']}\nloss curves: {paths['losses']}\ntable: {paths['table']}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate images; <lora:NAME:WEIGHT> in the prompt loads LoRAs")
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--prompt", action="append", required=True, help="repeatable; A1111 <lora:NAME:W> tags allowed")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--lora-dir", action="append", help="folder to find LoRAs in (repeatable; default ./output and "
                   "./models/Lora)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (seeds SEED, SEED+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--scheduler", default="euler_a", choices=("euler_a", "euler", "ddim", "dpm++"))
    p.add_argument("--sweep", metavar="0,0.4,0.6,0.8,1", help="strengths for the prompt's first LoRA: a labelled grid")
    p.add_argument("--out", default="generated", help="folder for the PNGs (numbered; never overwritten)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="compare training runs: images on the same prompts/seeds, loss curves, settings")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dir folders of finished runs")
    p.add_argument("--prompt", action="append", required=True, help="repeatable; each run's LoRA is added to it")
    p.add_argument("--negative")
    p.add_argument("--weight", type=float, default=1.0, help="strength of each run's LoRA")
    p.add_argument("--step", type=int, help="use each run's checkpoint at this step instead of its final file")
    p.add_argument("--base", help="base model (default: the one the runs trained on)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--size")
    p.add_argument("--scheduler", default="euler_a", choices=("euler_a", "euler", "ddim", "dpm++"))
    p.add_argument("--out", default="compare", help="folder for compare.png, compare_loss.png, compare.md")
    p.set_defaults(func=cmd_compare)
