"""Command line: parse arguments, call the library, print errors. The only module that exits."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import LoraScriptsError, TrainingInterrupted


def _quiet_libraries() -> None:
    # Keep the terminal for our progress bar and messages: transformers notes that torchvision is missing
    # (nothing here needs it) and diffusers logs every skipped EMA key of a pruned checkpoint.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in ("matplotlib", "PIL", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training.loop import train

    result = train(load_config(args.config, args.set), resume=args.resume, overwrite=args.overwrite)
    print(f"\nLoRA written: {result.lora_path}  ({result.steps} steps, final loss {result.final_loss:.4f})")
    if result.verified:
        print(f"Self-test: {result.verified}")
    print(f"Use it in A1111/ComfyUI as <lora:{result.lora_path.stem}:0.8>; loss curve: {result.output_dir / 'loss.png'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.check import check_dataset

    report = check_dataset(load_config(args.config, args.set), trigger=args.trigger, vram_gb=args.vram)
    print(report.to_json() if args.json else report.text())
    return 0 if report.ok else 1


def _cmd_label(args: argparse.Namespace) -> int:
    from .labeling.label import label_folder

    folder = Path(args.input)
    if not folder.is_dir():
        raise LoraScriptsError(f"{folder} is not a folder; give the folder that holds your training images")
    result = label_folder(folder, Path(args.output) if args.output else None, args.backend, args.model,
                          args.trigger or "", args.template, args.overwrite, args.threshold)
    for problem in result.failed:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"wrote {result.csv_path}: {result.written} new captions, {result.kept} kept"
          + (f", {len(result.failed)} unreadable images skipped" if result.failed else ""))
    print("Read them through: captions decide what the LoRA learns (subject, environment, lighting, style).")
    return 0


def add_label_arguments(p: argparse.ArgumentParser, positional: bool = True) -> None:
    from .labeling.basic import DEFAULT_TEMPLATE

    if positional:
        p.add_argument("input", metavar="DIR", help="folder of training images")
    else:
        p.add_argument("--input", required=True, help="folder of training images")
    p.add_argument("--output", help="CSV to write (default: DIR/metadata.csv)")
    p.add_argument("--backend", choices=("basic", "blip", "wd14"), default="basic",
                   help="basic needs no weights; blip and wd14 need --model")
    p.add_argument("--model", help="blip: local folder or cached model id; wd14: folder with model.onnx + selected_tags.csv")
    p.add_argument("--trigger", help="word put first in every caption, e.g. sci_lab")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="basic backend layout (fields: trigger, subject, "
                   "environment, lighting, style)")
    p.add_argument("--threshold", type=float, default=0.35, help="wd14: minimum tag probability")
    p.add_argument("--overwrite", action="store_true", help="re-caption images that already have a caption")
    p.set_defaults(func=_cmd_label)


def _cmd_init(args: argparse.Namespace) -> int:
    from .atomic import atomic_write_text
    from .init_config import starter_yaml

    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise LoraScriptsError(f"{data_dir} is not a folder; give the folder that holds your training images")
    out = Path(args.output or f"{data_dir.name}.yaml")
    text = starter_yaml(data_dir, args.base, Path.cwd() if args.output == "-" else out.parent, args.vram)
    if args.output == "-":
        print(text, end="")
        return 0
    if out.exists() and not args.force:
        raise LoraScriptsError(f"{out} already exists; choose another --output or add --force to replace it")
    atomic_write_text(out, text)
    print(f"wrote {out}; edit base_model if needed, then: lora-scripts train --config {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .toy.demo import run_demo

    result = run_demo(Path(args.out), args.set)
    s = result.stats
    print(f"\nDemo LoRA:     {result.train.lora_path}")
    print(f"Contact sheet: {result.sheet}")
    print(f"Loss curve:    {result.train.output_dir / 'loss.png'}")
    print("Style distance to the training set (0 = same palette): base {:.2f}, <lora:0.5> {:.2f}, <lora:1.0> {:.2f}"
          .format(s["strength_0.0"]["style_distance"], s["strength_0.5"]["style_distance"],
                  s["strength_1.0"]["style_distance"]))
    return 0


def _cmd_toy_build_base(args: argparse.Namespace) -> int:
    from .toy.assets import pack_toy_base
    from .toy.pretrain import QUICK_BUILD, build_base

    steps = QUICK_BUILD if args.quick else {}
    path = build_base(Path(args.out), seed=args.seed, reuse_vae=args.reuse_vae, **steps)
    print(f"toy base model written: {path}")
    if args.install:
        build = {"seed": args.seed, **steps, "reuse_vae": str(args.reuse_vae) if args.reuse_vae else None}
        packed = pack_toy_base(path, Path(__file__).parent / "assets" / "toy", build)
        print(f"packed into {packed}")
    return 0


def _cmd_toy_build_controlnet(args: argparse.Namespace) -> int:
    from .toy.assets import toy_base_path, toy_controlnet_asset
    from .toy.controlnet import QUICK_BUILD, build_controlnet

    path = build_controlnet(Path(args.out), Path(args.base) if args.base else toy_base_path(), seed=args.seed,
                            **(QUICK_BUILD if args.quick else {}))
    print(f"toy ControlNet written: {path}")
    if args.install:
        import shutil

        shutil.copyfile(path, toy_controlnet_asset())
        print(f"installed as {toy_controlnet_asset()}")
    return 0


def _cmd_toy_sets(args: argparse.Namespace) -> int:
    from .toy.scenes import write_arm_set, write_neon_set

    out = Path(args.out)
    print(write_neon_set(out / "neon_lab", args.count, args.size, args.seed))
    print(write_arm_set(out / "robotic_arm", args.count, args.size, args.seed))
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    try:
        from .ui.server import serve
    except ImportError as exc:
        raise LoraScriptsError(f"the web UI needs FastAPI and uvicorn ({exc}); pip install fastapi uvicorn "
                               "python-multipart") from None
    serve(Path(args.workspace), args.host, args.port)
    return 0


class _Parser(argparse.ArgumentParser):
    """A bad argument gets one line naming it and where the options are listed, like every other refusal,
    instead of argparse's whole usage block above it. Sub-commands inherit this class."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-scripts", description="Train Stable Diffusion LoRAs from a YAML config.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("--config", required=True, help="YAML file (see `lora-scripts init`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in output_dir, or from the given checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds another run")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("check", help="pre-flight report: bad images and captions, schedule, advice, memory estimate")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--trigger", help="trigger word every caption should contain (default: guessed)")
    p.add_argument("--vram", type=float, metavar="GB", help="GPU memory you have; warns if the estimate exceeds it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_check)
    add_label_arguments(sub.add_parser("label", help="caption a folder of images into metadata.csv"))
    p = sub.add_parser("init", help="write a starter YAML for a folder of images")
    p.add_argument("data_dir")
    p.add_argument("--base", help="base model checkpoint (default: ./models/Stable-diffusion/v1-5-pruned.safetensors)")
    p.add_argument("--output", "-o", help="YAML to write (default: DATA_DIR_NAME.yaml; '-' prints it)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--vram", type=float, metavar="GB", help="GPU memory you have: the settings that fit it are "
                   "written (as `check --vram` proposes them)")
    p.set_defaults(func=_cmd_init)
    p = sub.add_parser("demo", help="train the toy 'neon lab' LoRA offline (no downloads)")
    p.add_argument("--out", default="demo_output", help="folder for the demo model, data and results")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the demo config")
    p.set_defaults(func=_cmd_demo)
    toy = sub.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    p = toy.add_parser("build-base", help="pretrain the toy base model from scratch (~20 min on 2 CPU cores)")
    p.add_argument("--out", default="toy-sd15.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline, draws nothing")
    p.add_argument("--install", action="store_true", help="also pack it into the package as the shipped base")
    p.add_argument("--reuse-vae", type=Path, help="take the VAE from an earlier toy checkpoint instead of training one")
    p.set_defaults(func=_cmd_toy_build_base)
    p = toy.add_parser("build-controlnet", help="train the toy base's canny ControlNet (~20 min on 2 CPU cores)")
    p.add_argument("--out", default="toy-controlnet-canny.safetensors")
    p.add_argument("--base", help="the toy base to train it for (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline")
    p.add_argument("--install", action="store_true", help="also ship it in the package as the toy ControlNet")
    p.set_defaults(func=_cmd_toy_build_controlnet)
    p = toy.add_parser("sets", help="write the two toy target sets (neon style, robotic-arm subject)")
    p.add_argument("--out", default="toy_sets")
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_toy_sets)
    p = sub.add_parser("ui", help="the web UI: configure, check, train, watch and try LoRAs in a browser")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs the "
                   "token the server prints")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="lora-workspace", help="folder the UI reads and writes (configs, "
                   "images, outputs); a new one starts with the toy world")
    p.set_defaults(func=_cmd_ui)
    from .generation.commands import add_commands as add_generate
    from .interop.commands import add_commands as add_interop

    add_generate(sub)
    add_interop(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()  # first: checking an argument may already import diffusers/transformers
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except LoraScriptsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A full disk outside our atomic writers (logs, TensorBoard) still gets a plain answer, not a traceback.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: disk full ({exc}); free some space, then run the same command with --resume",
                  file=sys.stderr)
            return 2
        # Any other file-system refusal (permissions, a folder where a file belongs, a vanished file) is about a
        # path the user gave or chose: name it and the reason instead of a traceback.
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 2


def _os_error(exc: OSError) -> str:
    where = exc.filename
    if where and exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hints = {errno.EACCES: "choose a folder you own or fix its permissions",
             errno.EPERM: "choose a folder you own or fix its permissions",
             errno.EROFS: "the disk is read-only; choose another folder",
             errno.EISDIR: "a folder is in the way; give a file name",
             errno.ENOTDIR: "a file is in the way; give a folder",
             errno.ENOENT: "check the path"}
    hint = hints.get(exc.errno, "check the path and try again")
    return f"{reason}: {where}; {hint}" if where else f"{reason}; {hint}"


if __name__ == "__main__":
    sys.exit(main())
