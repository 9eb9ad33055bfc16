"""Command-line handlers for inspect, convert, merge, resize and verify (registered by lora_scripts.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..base_args import add_base_file_args, base_files
from ..errors import LoraScriptsError
from ..dtypes import DTYPES, SAVE_PRECISIONS
from .files import check_base, check_rank, convert_file, ranks_text, refuse_overwrite, resize_file


def positive_int(text: str) -> int:
    """argparse type for --rank: refused before anything is read, with the reason."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 8)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: a rank must be at least 1 (typical: 4 to 32)")
    return value


def _lora_arg(text: str) -> tuple[Path, float]:
    """A.safetensors:0.8 -> (path, 0.8); no weight = 1.0. A Windows drive letter is not a weight; a weight that
    is not a number is an error, not part of the file name."""
    from ..generation.prompts import parse_weight

    head, sep, tail = text.rpartition(":")
    if sep and head and tail and not tail.startswith(("\\", "/")) and not Path(text).exists():
        try:
            return Path(head), parse_weight(tail, f"--lora {text}")
        except ValueError:
            if Path(head).exists():
                raise
    return Path(text), 1.0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .describe import describe

    d = describe(Path(args.file))
    print(d.to_json() if args.json else d.text())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.output)
    refuse_overwrite(out, args.force)
    print(convert_file(Path(args.input), out, args.to, Path(args.base) if args.base else None, args.dtype))
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    out = Path(args.output)
    refuse_overwrite(out, args.force)
    r = resize_file(Path(args.input), out, args.rank, args.dtype)
    print(f"wrote {out}: {r.rank_change()}, {out.stat().st_size / 2**20:.2f} MiB")
    print(f"kept energy (share of the update's squared singular values): mean {r.mean_energy:.4f}, "
          f"lowest {r.worst.energy:.4f} in {r.worst.name}")
    if args.verbose:
        for k in r.kept:
            print(f"  {k.name}: rank {k.rank_before} -> {k.rank_after}, energy {k.energy:.4f}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .describe import guess_family
    from .files import read_checked
    from .lora_file import kohya_state, require_plain_lora
    from .metadata import derived_metadata
    from .ops import bake, check_same_shapes, combine
    from ..atomic import atomic_save_safetensors

    check_rank(args.rank)
    if args.base and args.rank:
        raise LoraScriptsError("--rank applies when LoRAs are merged into one LoRA; with --base they are baked into "
                               "the checkpoint at full strength. Drop --rank or --base")
    out = Path(args.out)
    refuse_overwrite(out, args.force)
    base = check_base(Path(args.base)) if args.base else None
    parsed = [_lora_arg(a) for a in args.lora]
    loras = [(read_checked(p, "merging"), w) for p, w in parsed]
    names = ", ".join(f"{p.name}:{w:g}" for p, w in parsed)
    check_same_shapes(loras, [p.name for p, _ in parsed])
    if base is not None:
        from .table import base_configs, module_table

        path, changed = bake(base, loras, module_table(base_configs(base)), out,
                             {"lora_scripts.merged_loras": names})
        print(f"wrote {path}: {base.name} with {names} baked in ({changed} weights changed); "
              "load it in A1111/ComfyUI as a checkpoint")
        return 0
    for (path, _), (lora, _) in zip(parsed, loras):
        require_plain_lora(lora, path, "merging into one LoRA")
    _same_family(loras, [p.name for p, _ in parsed])
    result, kept = combine(loras, args.rank)
    state = kohya_state(result, DTYPES[args.dtype] if args.dtype else result.dtype)
    first = loras[0][0]
    how = _merge_how(args.rank, kept, [state[k].shape[0] for k in state if k.endswith(".lora_down.weight")])
    meta = derived_metadata(first, result, state, guess_family(first), f"merged {names} by lora-scripts, {how}")
    atomic_save_safetensors(state, out, meta)
    energies = [k.energy for k in kept]
    print(f"wrote {out}: {names} as one LoRA, {how}, {len(kept)} modules; kept energy mean "
          f"{sum(energies) / len(energies):.4f}")
    return 0


def _merge_how(rank: int | None, kept, written: list[int]) -> str:
    """How the file was made, with the rank it really has (figures from the tensors written)."""
    stacked = max(k.rank_before for k in kept)
    if rank is None:
        return f"ranks stacked to rank {ranks_text(written)} (exact)"
    if rank >= stacked:
        return (f"kept rank {ranks_text(written)} (the sum of the inputs' ranks; --rank {rank} would only add "
                "zeros), exact")
    return f"rank {ranks_text(written)} by SVD"


def _same_family(loras, labels: list[str]) -> None:
    """LoRAs whose layers tell their family apart must agree (an SDXL and an SD1 LoRA share no layer to sum)."""
    from .describe import guess_family

    families = [(label, guess_family(lora)) for (lora, _), label in zip(loras, labels)]
    known = [(label, f) for label, f in families if not f.startswith("unknown")]
    if len({f for _, f in known}) > 1:
        listed = ", ".join(f"{label} is {f}" for label, f in known)
        raise LoraScriptsError(f"cannot merge LoRAs for different model families ({listed}); merge only LoRAs "
                               "trained on the same base model")


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    files, _ = base_files(args, base=Path(args.base))
    report = verify(Path(args.file), check_base(Path(args.base)), files=files)
    if args.json:
        print(json.dumps({"ok": report.ok, "modules": report.modules, "problems": report.problems(),
                          "max_rel_error": report.max_rel_error}, indent=2))
    else:
        print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def add_commands(sub) -> None:
    p = sub.add_parser("inspect", help="show what a LoRA file holds and what loaders would drop")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a LoRA between kohya (A1111/ComfyUI) and diffusers layouts")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=("kohya", "diffusers"), required=True)
    p.add_argument("--base", type=Path, help="base model whose layers name the modules (default: the real model "
                   "of the family the LoRA was trained on, from its embedded configs)")
    p.add_argument("--dtype", choices=SAVE_PRECISIONS, help="default: as the input")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="bake LoRAs into a checkpoint (--base), or merge several LoRAs into one")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]")
    p.add_argument("--base", help="checkpoint to bake the LoRAs into; without it the LoRAs become one LoRA")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=positive_int, help="LoRA merge: SVD to this rank (default: stack ranks, exact)")
    p.add_argument("--dtype", choices=SAVE_PRECISIONS)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("resize", help="change a LoRA's rank by SVD (like sd-scripts resize_lora)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--rank", type=positive_int, required=True, help="the rank to cut to (at least 1; a LoRA "
                   "cannot gain rank, so a value above the file's keeps its rank)")
    p.add_argument("--dtype", choices=SAVE_PRECISIONS)
    p.add_argument("--verbose", "-v", action="store_true", help="kept energy per module")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("verify", help="check that every key of a LoRA is applied by A1111/ComfyUI naming and diffusers")
    p.add_argument("file")
    p.add_argument("--base", required=True)
    p.add_argument("--json", action="store_true")
    add_base_file_args(p)
    p.set_defaults(func=cmd_verify)
