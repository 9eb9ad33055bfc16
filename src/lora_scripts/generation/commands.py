"""`lora-scripts generate`: images from prompts with <lora:NAME:W> tags, single images or a strength sweep."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from ..base_args import add_base_file_args, base_files
from ..errors import LoraScriptsError


def ranged(kind: type, key: str) -> Callable[[str], float]:
    """argparse type: a number within render.LIMITS[key], refused before the model loads, naming the flag."""
    def parse(text: str):
        from .render import out_of_range

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if why := out_of_range(key, value):
            raise argparse.ArgumentTypeError(why)
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def parse_size(text: str, name: str = "--size") -> tuple[int, int]:
    from .render import out_of_range

    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise LoraScriptsError(f"{name} {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    w, h = int(m[1]), int(m[2] or m[1])
    for side in (w, h):
        if why := out_of_range("side", side):
            raise LoraScriptsError(f"{name} {text}: {why}")
    if w % 8 or h % 8:
        raise LoraScriptsError(f"{name} {text}: both sides must be multiples of 8 (the VAE works in 8-pixel cells)")
    return w, h


def parse_strengths(text: str) -> list[float]:
    from .sweeps import check_strengths

    try:
        strengths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LoraScriptsError(f"--sweep {text!r}: expected numbers separated by commas, e.g. 0,0.4,0.6,0.8,1") from None
    check_strengths(strengths)
    return strengths


def read_prompt_files(files: list[str] | None) -> list[str]:
    """One prompt per line, as A1111's "prompts from file" script reads them; blank lines and # comments skipped."""
    prompts = []
    for name in files or []:
        path = Path(name)
        if path.is_dir():
            raise LoraScriptsError(f"--prompt-file {path} is a folder; give a text file with one prompt per line")
        if not path.is_file():
            raise LoraScriptsError(f"--prompt-file {path} does not exist; give a text file with one prompt per line")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise LoraScriptsError(f"--prompt-file {path} is not UTF-8 text (byte {exc.object[exc.start]:#x} at "
                                   f"position {exc.start}); save it as UTF-8") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not found:
            raise LoraScriptsError(f"--prompt-file {path} holds no prompts (one per line; # starts a comment)")
        prompts += found
    return prompts


def check_out_folder(out: Path) -> None:
    """--out is a folder of PNGs: not a file, and not under one."""
    if out.exists() and not out.is_dir():
        raise LoraScriptsError(f"--out {out} is a file; --out names the folder the PNGs go into (e.g. --out generated)")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise LoraScriptsError(f"--out {out}: {blocker} is a file, not a folder; choose another --out")


def _check_prompts(prompts: list[str], dirs: list[Path]) -> None:
    """Every tag readable and every LoRA found, before the base model takes its time to load."""
    from .lora_lookup import index_loras, resolve
    from .prompts import parse_prompt

    index = index_loras(dirs)
    for prompt in prompts:
        for ref in parse_prompt(prompt)[1]:
            resolve(ref.name, index, dirs)


def _next_index(out: Path) -> int:
    """Continue numbering after the images already there: a second run never overwrites the first."""
    taken = [int(p.name.split("-")[0]) for p in out.glob("[0-9]*-*.png") if p.name.split("-")[0].isdigit()]
    return max(taken, default=-1) + 1


def cmd_generate(args: argparse.Namespace) -> int:
    from .lora_lookup import DEFAULT_DIRS
    from .pnginfo import save_png
    from .render import Renderer, Settings, check_seeds
    from .sweeps import strength_sweep

    prompts = list(args.prompt or []) + read_prompt_files(args.prompt_file)
    if not prompts:
        raise LoraScriptsError("no prompt given; add --prompt \"TEXT\" or --prompt-file FILE")
    settings = Settings(steps=args.steps, cfg=args.cfg, scheduler=args.scheduler,
                        size=parse_size(args.size) if args.size else None, negative=args.negative or "")
    strengths = parse_strengths(args.sweep) if args.sweep is not None else None
    seeds = [args.seed + i for i in range(args.n)]
    check_seeds(seeds)
    out = Path(args.out)
    check_out_folder(out)
    dirs = [Path(d) for d in args.lora_dir] if args.lora_dir else list(DEFAULT_DIRS)
    _check_prompts(prompts, dirs)
    controls, ip_adapter = control_units(args)
    if strengths is not None:
        from .sweeps import with_strength

        for p in prompts:
            with_strength(p, 1.0)
    files, tokenizer_dir = base_files(args, base=Path(args.base))
    renderer = Renderer(Path(args.base), dirs, settings, args.prediction_type or "auto", args.zero_terminal_snr,
                        files, tokenizer_dir, controls, ip_adapter)
    if strengths is not None:
        sheet, results = strength_sweep(renderer, prompts, seeds, strengths)
    else:
        results = [r for p in prompts for r in renderer.render(p, seeds)]
    out.mkdir(parents=True, exist_ok=True)
    index = _next_index(out)
    if strengths is not None:
        sheet_path = out / f"{index:05d}-sweep.png"
        sheet.save(sheet_path)
        index += 1
    written = []
    for r in results:
        written.append(save_png(r.image, out / f"{index:05d}-{r.params.seed}.png", r.params))
        index += 1
    maps = write_control_maps(renderer, out, index) if args.control_preview else []
    print(f"wrote {len(written)} images to {out}" + (f"; sweep sheet: {sheet_path}" if strengths is not None else "")
          + (f"; control maps: {', '.join(str(p) for p in maps)}" if maps else ""))
    return 0


def control_units(args: argparse.Namespace):
    """The --control units and the --ip-adapter, every image opened once: a wrong path fails before the base
    model loads."""
    from .control import parse_units
    from .ip_adapter import parse_unit

    units = parse_units(args.control, args.control_image, args.control_weight, args.control_start, args.control_end,
                        args.canny_thresholds, args.control_mode)
    for unit in units:
        unit.read_image()
    if args.control_preview and not units:
        raise LoraScriptsError("--control-preview writes the maps of --control units; none was given")
    return units, parse_unit(args.ip_adapter, args.ip_image, args.ip_scale, args.ip_encoder)


def write_control_maps(renderer, out: Path, index: int) -> list[Path]:
    """--control-preview: the maps the ControlNets saw, numbered after the images (never overwriting)."""
    from ..atomic import atomic_write

    size = renderer.settings.size or renderer.model.native_size
    paths = []
    for i, (unit, image) in enumerate(zip(renderer.controls, renderer.control_maps(size))):
        path = out / f"{index:05d}-control-{i}-{unit.kind}.png"
        paths.append(atomic_write(path, lambda p, im=image: im.save(p, format="PNG")))
    return paths


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import image_grid, read_run, table_markdown, write_comparison
    from .render import Renderer, Settings, check_seeds

    settings = Settings(steps=args.steps, cfg=args.cfg, scheduler=args.scheduler,
                        size=parse_size(args.size) if args.size else None, negative=args.negative or "")
    seeds = [args.seed + i for i in range(args.n)]
    check_seeds(seeds)
    check_out_folder(Path(args.out))
    runs = [read_run(Path(d), args.step) for d in args.runs]
    bases = {str(r.config.get("base_model")) for r in runs}
    if not args.base and len(bases) > 1:
        raise LoraScriptsError(f"the runs used different base models ({', '.join(sorted(bases))}); pick one with --base")
    base = Path(args.base or bases.pop())
    # The objective the runs trained with (an SD2 file may not say it itself), unless --prediction-type says.
    kind = args.prediction_type or next((r.config.get("prediction_type") for r in runs), None) or "auto"
    ztsnr = args.zero_terminal_snr or any(r.config.get("zero_terminal_snr") for r in runs)
    # The runs' own component files (a Flux base kept as separate files), unless the command line names others.
    files, tokenizer_dir = base_files(args, next((r.config for r in runs if r.config.get("clip_l")), {}), base)
    controls, ip_adapter = control_units(args)
    renderer = Renderer(base, [], settings, kind, ztsnr, files, tokenizer_dir, controls, ip_adapter)
    sheet = image_grid(renderer, runs, args.prompt, seeds, args.weight)
    paths = write_comparison(Path(args.out), sheet, runs)
    print(table_markdown(runs))
    print(f"images: {paths['sheet']}\nloss curves: {paths['losses']}\ntable: {paths['table']}")
    return 0


def _weight(text: str) -> float:
    from .prompts import parse_weight

    try:
        return parse_weight(text, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sampling_arguments(p: argparse.ArgumentParser, n_help: str) -> None:
    p.add_argument("--n", type=ranged(int, "count"), default=1, help=n_help)
    p.add_argument("--seed", type=ranged(int, "seed"), default=0)
    p.add_argument("--steps", type=ranged(int, "steps"), help="default 30; Flux.1-dev 28, schnell 4")
    p.add_argument("--cfg", type=ranged(float, "cfg"), help="classifier-free guidance scale (Flux.1-dev: its distilled "
                   "guidance); default 7; Flux.1-dev 3.5, schnell 0")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--scheduler", default="euler_a", choices=("euler_a", "euler", "ddim", "dpm++"))
    p.add_argument("--prediction-type", choices=("auto", "epsilon", "v_prediction"),
                   help="what the base predicts, where its file does not say (SD2 single files: epsilon for "
                   "512-base, v_prediction for 768-v)")
    p.add_argument("--zero-terminal-snr", action="store_true", help="the base was trained with a zero-terminal-SNR "
                   "schedule (as zero_terminal_snr: true in a config): sample it that way")
    add_base_file_args(p)
    _control_arguments(p)


def _control_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet (layout from a map; repeat --control for several, options in the same order)")
    g.add_argument("--control", action="append", metavar="TYPE:MODEL", help="preprocessor (canny, softedge, lineart; "
                   "none/depth/pose: the image is the map) and ControlNet file, folder or name in models/ControlNet")
    g.add_argument("--control-image", action="append", metavar="IMG", help="one per --control")
    g.add_argument("--control-weight", action="append", type=float, metavar="W", help="0 to 2 (default 1)")
    g.add_argument("--control-start", action="append", type=float, metavar="S", help="share of the steps before "
                   "the ControlNet acts (default 0)")
    g.add_argument("--control-end", action="append", type=float, metavar="E", help="share of the steps after which "
                   "it stops (default 1)")
    g.add_argument("--canny-thresholds", action="append", metavar="LOW,HIGH", help="canny's thresholds (default "
                   "100,200)")
    g.add_argument("--control-mode", action="append", type=int, metavar="N", help="a union ControlNet's control "
                   "type (InstantX/Shakker-Labs Flux union: 0 canny, 1 tile, 2 depth, 3 blur, 4 pose, 5 gray)")
    g.add_argument("--control-preview", action="store_true", help="also write the maps the ControlNets saw")
    g = p.add_argument_group("IP-Adapter (the look of a reference image)")
    g.add_argument("--ip-adapter", metavar="MODEL", help="IP-Adapter file, e.g. ip-adapter_sd15.safetensors")
    g.add_argument("--ip-image", metavar="IMG", help="the reference image")
    g.add_argument("--ip-scale", type=float, metavar="S", help="0 to 2 (default 1; 0.5-0.8 keeps more of the prompt)")
    g.add_argument("--ip-encoder", metavar="FOLDER", help="its CLIP vision encoder folder (default: image_encoder "
                   "beside the IP-Adapter file)")


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate images; <lora:NAME:WEIGHT> in the prompt loads LoRAs")
    p.add_argument("--base", required=True, help="base checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("--prompt", action="append", help="repeatable; A1111 <lora:NAME:W> tags allowed")
    p.add_argument("--prompt-file", action="append", metavar="FILE", help="text file, one prompt per line (repeatable)")
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--lora-dir", action="append", help="folder to find LoRAs in (repeatable; default ./output and "
                   "./models/Lora)")
    _sampling_arguments(p, "images per prompt (seeds SEED, SEED+1, ...)")
    p.add_argument("--sweep", metavar="0,0.4,0.6,0.8,1", help="strengths for the prompt's first LoRA: a labelled grid")
    p.add_argument("--out", default="generated", help="folder for the PNGs (numbered; never overwritten)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="compare training runs: images on the same prompts/seeds, loss curves, settings")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dir folders of finished runs")
    p.add_argument("--prompt", action="append", required=True, help="repeatable; each run's LoRA is added to it")
    p.add_argument("--negative")
    p.add_argument("--weight", type=_weight, default=1.0, help="strength of each run's LoRA")
    p.add_argument("--step", type=ranged(int, "step"), help="use each run's checkpoint at this step instead of its "
                   "final file")
    p.add_argument("--base", help="base model (default: the one the runs trained on)")
    _sampling_arguments(p, "images per prompt")
    p.add_argument("--out", default="compare", help="folder for compare.png, compare_loss.png, compare.md")
    p.set_defaults(func=cmd_compare)
