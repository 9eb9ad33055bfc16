"""Bad-input cases for generate, inspect, verify, convert, merge, resize (rows of docs/bad_inputs.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers.bad_inputs import Accepted, Command, Refused  # noqa: F401

REFUSED: list[Refused] = []
ACCEPTED: list[Accepted] = []

# The tiny base's layers a test LoRA targets (in, out features); kohya names as A1111 reads them.
_LAYERS = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
           "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (64, 64)}


def lora(root: Path, name: str = "style.safetensors", rank: int | tuple[int, ...] = 4, alpha: bool = True,
         poison: float | None = None, widen: int = 1, prefix: str = "lora_unet_") -> str:
    """A small kohya LoRA for the tiny base, written with safetensors (no training). rank: one for all modules
    or one per module; poison: a value put into one lora_up (NaN/inf); widen: in-features x this (another model)."""
    g = torch.Generator().manual_seed(len(name))
    ranks = rank if isinstance(rank, tuple) else (rank,) * len(_LAYERS)
    state = {}
    for (module, (fin, fout)), r in zip(_LAYERS.items(), ranks):
        module = prefix + module.removeprefix("lora_unet_")
        state[f"{module}.lora_down.weight"] = torch.randn(r, fin * widen, generator=g) * 0.3
        state[f"{module}.lora_up.weight"] = torch.randn(fout, r, generator=g) * 0.3
        if alpha:
            state[f"{module}.alpha"] = torch.tensor(float(r))
    if poison is not None:
        state[next(k for k in state if k.endswith("lora_up.weight"))][0, 0] = poison
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return str(path)


def _truncated(root: Path) -> str:
    path = Path(lora(root, "whole.safetensors"))
    cut = root / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    return str(cut)


def _text(root: Path, name: str, text: str = "shopping list\n") -> str:
    (root / name).write_text(text)
    return str(root / name)


def _folder(root: Path, name: str = "loras") -> str:
    lora(root / name, "inside.safetensors")
    return str(root / name)


def _image(root: Path) -> str:
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(root / "layout.png")
    return str(root / "layout.png")


def gen(root: Path, base: Path, *extra: str, prompt: str = "a lab") -> list[str]:
    """`generate` with a LoRA folder under root holding style.safetensors; few steps, tiny images."""
    lora(root / "loras", "style.safetensors")
    return ["generate", "--base", str(base), "--prompt", prompt, "--lora-dir", str(root / "loras"), "--steps", "2",
            "--out", str(root / "gen"), *extra]


def _c(id: str, case: str, make: Callable[[Path, Path], list[str]], expect: str, code: int = 2) -> Command:
    return Command(id, case, make, expect, code)


COMMANDS: list[Command] = [
    # --- ranks: what is written is what is said ----------------------------------------------------------------
    _c("merge_rank_zero", "merge --rank 0", lambda r, b: ["merge", "--lora", lora(r), "--rank", "0", "--out",
                                                          str(r / "m.safetensors")],
       r"argument --rank: 0 is too small: a rank must be at least 1"),
    _c("resize_rank_negative", "resize --rank -2",
       lambda r, b: ["resize", lora(r), str(r / "r.safetensors"), "--rank", "-2"],
       r"argument --rank: -2 is too small: a rank must be at least 1"),
    _c("resize_rank_above_file", "resize --rank above the file's rank (8)",
       lambda r, b: ["resize", lora(r, rank=8), str(r / "r.safetensors"), "--rank", "100000"],
       r"kept rank 8 \(the file's rank; a LoRA cannot gain rank", code=0),
    _c("merge_rank_above_sum", "merge --rank above the inputs' ranks together",
       lambda r, b: ["merge", "--lora", lora(r, "a.safetensors"), "--lora", lora(r, "bb.safetensors", rank=8),
                     "--rank", "100000", "--out", str(r / "m.safetensors")],
       r"kept rank 12 \(the sum of the inputs' ranks", code=0),
    _c("resize_mixed_ranks", "resize a LoRA whose modules have different ranks",
       lambda r, b: ["resize", lora(r, rank=(2, 8)), str(r / "r.safetensors"), "--rank", "4"],
       r"rank 2 to 8 \(varies by module\) -> 2 to 4 \(varies by module\)", code=0),
    # --- files that are not what they should be ----------------------------------------------------------------
    _c("inspect_not_safetensors", "inspect a text file named .safetensors",
       lambda r, b: ["inspect", _text(r, "notes.safetensors")],
       r"notes\.safetensors: .*not a complete \.safetensors file"),
    _c("inspect_truncated", "inspect a truncated LoRA", lambda r, b: ["inspect", _truncated(r)],
       r"cut\.safetensors: .*truncated \(an interrupted download or copy\?\)"),
    _c("inspect_folder", "inspect a folder", lambda r, b: ["inspect", _folder(r)],
       r"loras is a folder, not a LoRA file; give the \.safetensors file itself \(it holds inside\.safetensors\)"),
    _c("inspect_base_model", "inspect a base checkpoint instead of a LoRA", lambda r, b: ["inspect", _base_here(r, b)],
       r"holds no LoRA weights .*looks like a full model checkpoint, not a LoRA"),
    _c("inspect_pickle", "inspect a pickled .pt LoRA", lambda r, b: ["inspect", _text(r, "old.pt")],
       r"old\.pt is a pickled \.pt file; only \.safetensors LoRA files are read"),
    _c("inspect_missing_alpha", "inspect a LoRA without .alpha keys", lambda r, b: ["inspect", lora(r, alpha=False)],
       r"2 modules have no \.alpha: loaders use alpha = rank", code=0),
    _c("inspect_rank_mismatch", "inspect a LoRA whose lora_up and lora_down ranks differ",
       lambda r, b: ["inspect", _rank_mismatch(r)], r"is damaged: .*lora_down has rank 4 but lora_up has rank 8"),
    _c("convert_output_folder", "convert to an output that is a folder",
       lambda r, b: ["convert", lora(r), str(r), "--to", "kohya"], r"output .* is a folder; give a file name"),
    _c("convert_output_under_file", "convert to an output under a file",
       lambda r, b: ["convert", lora(r), str(Path(_text(r, "notes.txt")) / "x.safetensors"), "--to", "kohya"],
       r"notes\.txt is a file, not a folder, so nothing can be written under it"),
    _c("convert_output_exists", "convert onto an existing file without --force",
       lambda r, b: ["convert", lora(r), lora(r, "other.safetensors"), "--to", "kohya"],
       r"other\.safetensors already exists; choose another output or add --force"),
    _c("convert_output_no_suffix", "convert to an output without .safetensors",
       lambda r, b: ["convert", lora(r), str(r / "converted"), "--to", "kohya"],
       r"give a file name ending in \.safetensors \(e\.g\. .*converted\.safetensors\)"),
    _c("convert_output_new_folder", "convert to an output whose folder does not exist (it is made)",
       lambda r, b: ["convert", lora(r), str(r / "new" / "deeper" / "x.safetensors"), "--to", "kohya"],
       r"wrote .*new/deeper/x\.safetensors", code=0),
    _c("convert_base_is_lora", "convert --base given a LoRA",
       lambda r, b: ["convert", lora(r), str(r / "d.safetensors"), "--to", "diffusers", "--base",
                     lora(r, "b.safetensors")],
       r"b\.safetensors is a LoRA file, not a base model"),
    _c("convert_base_folder", "convert --base given a folder",
       lambda r, b: ["convert", lora(r), str(r / "d.safetensors"), "--to", "diffusers", "--base", _folder(r)],
       r"--base .*loras is a folder; give the single-file base checkpoint"),
    _c("verify_base_missing", "verify --base that does not exist",
       lambda r, b: ["verify", lora(r), "--base", str(r / "v1-5-pruned.safetensors")],
       r"--base .*v1-5-pruned\.safetensors does not exist"),
    _c("verify_nan", "verify a LoRA holding NaN",
       lambda r, b: ["verify", lora(r, poison=float("nan")), "--base", str(b)],
       r"FAILED verification:.*1 weight tensor holds NaN or infinite values", code=1),
    _c("convert_nan", "convert a LoRA holding NaN", lambda r, b: ["convert", lora(r, poison=float("nan")),
                                                                  str(r / "x.safetensors"), "--to", "kohya"],
       r"style\.safetensors: 1 of 6 weight tensors holds NaN or infinite values"),
    _c("resize_inf", "resize a LoRA holding inf", lambda r, b: ["resize", lora(r, poison=float("inf")),
                                                                str(r / "x.safetensors"), "--rank", "2"],
       r"style\.safetensors: 1 of 6 weight tensors holds NaN or infinite values"),
    _c("merge_weight_not_number", "merge --lora FILE:abc", lambda r, b: ["merge", "--lora", lora(r) + ":abc", "--out",
                                                                         str(r / "m.safetensors")],
       r"--lora .*style\.safetensors:abc: weight 'abc' is not a number"),
    _c("merge_weight_nan", "merge --lora FILE:nan", lambda r, b: ["merge", "--lora", lora(r) + ":nan", "--out",
                                                                  str(r / "m.safetensors")],
       r"weight 'nan' is not a finite number"),
    _c("merge_other_shapes", "merge LoRAs for models of different sizes",
       lambda r, b: ["merge", "--lora", lora(r), "--lora", lora(r, "wide.safetensors", widen=2), "--out",
                     str(r / "m.safetensors")],
       r"style\.safetensors and wide\.safetensors change .* with different shapes .* cannot be merged"),
    _c("merge_other_families", "merge an SD1 LoRA with an SDXL LoRA",
       lambda r, b: ["merge", "--lora", _with_family(r, "sd1.safetensors", "sd1"), "--lora",
                     _with_family(r, "sdxl.safetensors", "sdxl"), "--out", str(r / "m.safetensors")],
       r"cannot merge LoRAs for different model families \(sd1\.safetensors is sd1, sdxl\.safetensors is sdxl\)"),
    _c("merge_lycoris_keys", "merge a LoRA holding an incomplete LyCORIS (LoHa) layer",
       lambda r, b: ["merge", "--lora", _with_loha(r), "--out", str(r / "m.safetensors")],
       r"holds 1 keys that are not plain LoRA weights \(e\.g\. .*hada_w1_a \(its hada_w1_b is missing\)\); "
       r"merging would drop them"),
    _c("merge_base_is_lora", "merge --base given a LoRA",
       lambda r, b: ["merge", "--lora", lora(r), "--base", lora(r, "b.safetensors"), "--out", str(r / "m.safetensors")],
       r"b\.safetensors is a LoRA file, not a base model"),
    _c("merge_rank_with_base", "merge --rank together with --base",
       lambda r, b: ["merge", "--lora", lora(r), "--base", str(b), "--rank", "4", "--out", str(r / "m.safetensors")],
       r"--rank applies when LoRAs are merged into one LoRA"),
    # --- generate ---------------------------------------------------------------------------------------------
    _c("generate_weight_not_number", "generate with <lora:x:abc>",
       lambda r, b: gen(r, b, prompt="a lab <lora:style:abc>"),
       r"<lora:style:abc>: weight 'abc' is not a number"),
    _c("generate_nan_lora", "generate with a LoRA holding NaN",
       lambda r, b: (lora(r / "loras", "broken.safetensors", poison=float("nan")),
                     gen(r, b, prompt="a lab <lora:broken:1>"))[1],
       r"broken\.safetensors: 1 of 6 weight tensors holds NaN or infinite values .*earlier checkpoint"),
    _c("generate_steps_zero", "generate --steps 0", lambda r, b: gen(r, b, "--steps", "0"),
       r"argument --steps: 0 is not allowed for sampling steps: use 1 to 500"),
    _c("generate_steps_huge", "generate --steps 100000", lambda r, b: gen(r, b, "--steps", "100000"),
       r"argument --steps: 100000 is not allowed"),
    _c("generate_n_negative", "generate --n -1", lambda r, b: gen(r, b, "--n", "-1"),
       r"argument --n: -1 is not allowed for images per prompt"),
    _c("generate_seed_negative", "generate --seed -1", lambda r, b: gen(r, b, "--seed", "-1"),
       r"argument --seed: -1 is not allowed for a seed: use 0 to 4294967295"),
    _c("generate_seed_past_end", "generate seeds past the last seed",
       lambda r, b: gen(r, b, "--seed", "4294967295", "--n", "2"),
       r"the seeds run 4294967295 to 4294967296: 4294967296 is not allowed for a seed: use 0 to 4294967295"),
    _c("generate_cfg_nan", "generate --cfg nan", lambda r, b: gen(r, b, "--cfg", "nan"),
       r"argument --cfg: nan is not allowed for the guidance scale"),
    _c("generate_size_zero", "generate --size 0x0", lambda r, b: gen(r, b, "--size", "0x0"),
       r"--size 0x0: 0 is not allowed for an image side in pixels"),
    _c("generate_size_huge", "generate --size 100000x64", lambda r, b: gen(r, b, "--size", "100000x64"),
       r"100000 is not allowed for an image side"),
    _c("generate_out_is_file", "generate --out naming an existing file",
       lambda r, b: gen(r, b) + ["--out", _text(r, "notes.txt")],
       r"--out .*notes\.txt is a file; --out names the folder the PNGs go into"),
    _c("generate_unknown_lora", "generate with a <lora:name> that names no file",
       lambda r, b: gen(r, b, prompt="a lab <lora:nothing_like_it:1>"),
       r"no LoRA named 'nothing_like_it' in .*loras\. Available: style\. Add its folder with --lora-dir"),
    _c("generate_lora_dir_missing", "generate --lora-dir that does not exist",
       lambda r, b: ["generate", "--base", str(b), "--prompt", "<lora:style>", "--lora-dir", str(r / "nowhere")],
       r"no LoRA named 'style' in .*nowhere \(.*nowhere does not exist\)\. No LoRA files"),
    _c("generate_prompt_file_missing", "generate --prompt-file that does not exist",
       lambda r, b: ["generate", "--base", str(b), "--prompt-file", str(r / "prompts.txt")],
       r"--prompt-file .*prompts\.txt does not exist; give a text file with one prompt per line"),
    _c("generate_lora_is_checkpoint", "generate with a <lora:name> that is a base checkpoint",
       lambda r, b: ["generate", "--base", str(b), "--prompt", "<lora:model>", "--lora-dir", _base_here(r, b),
                     "--steps", "2", "--out", str(r / "gen")],
       r"holds no LoRA weights .*full model checkpoint"),
    _c("generate_lora_truncated", "generate with a truncated LoRA",
       lambda r, b: ["generate", "--base", str(b), "--prompt", "<lora:cut>", "--lora-dir", _truncated(r),
                     "--steps", "2", "--out", str(r / "gen")],
       r"cut\.safetensors: .*not a complete \.safetensors file"),
    _c("generate_lora_other_model", "generate with a LoRA for a model of another size",
       lambda r, b: (lora(r / "loras", "wide.safetensors", widen=2), gen(r, b, prompt="<lora:wide>"))[1],
       r"wide\.safetensors does not fit this base model: 2 modules have other shapes"),
    _c("generate_lora_sdxl_names", "generate with a LoRA whose names fit no layer (SDXL text encoder)",
       lambda r, b: (lora(r / "loras", "xl.safetensors", prefix="lora_te1_text_model_"),
                     gen(r, b, prompt="<lora:xl>"))[1],
       r"none of its 2 modules names a layer of this base model"),
    _c("generate_sweep_nan", "generate --sweep with nan", lambda r, b: gen(r, b, "--sweep", "0,nan",
                                                                            prompt="a lab <lora:style>"),
       r"--sweep: strength nan is not a finite number"),
    # --- generate with ControlNet / IP-Adapter ------------------------------------------------------------------
    _c("generate_control_without_image", "generate --control without --control-image",
       lambda r, b: gen(r, b, "--control", f"canny:{lora(r)}"),
       r"1 --control given with 0 --control-image; give one image per ControlNet, in the same order"),
    _c("generate_control_weight_range", "generate --control-weight 5",
       lambda r, b: gen(r, b, "--control", f"canny:{lora(r)}", "--control-image", _image(r), "--control-weight", "5"),
       r"--control-weight 5: use 0 to 2 \(1 = as trained, 0 = off\)"),
    _c("generate_control_image_missing", "generate --control-image that does not exist",
       lambda r, b: gen(r, b, "--control", f"canny:{lora(r)}", "--control-image", str(r / "layout.png")),
       r"--control-image .*layout\.png does not exist"),
    _c("generate_control_is_lora", "generate --control naming a LoRA file",
       lambda r, b: gen(r, b, "--control", f"canny:{lora(r)}", "--control-image", _image(r)),
       r"style\.safetensors is a LoRA \(use it as <lora:NAME:WEIGHT> in the prompt\)"),
    _c("generate_control_unknown_type", "generate --control with an unknown preprocessor",
       lambda r, b: gen(r, b, "--control", f"hed:{lora(r)}", "--control-image", _image(r)),
       r"unknown preprocessor 'hed'; use one of canny, softedge, lineart, none"),
    _c("generate_ip_adapter_without_encoder", "generate --ip-adapter with no image encoder beside it",
       lambda r, b: gen(r, b, "--ip-adapter", lora(r, "ip-adapter_sd15.safetensors"), "--ip-image", _image(r)),
       r"no image encoder for ip-adapter_sd15\.safetensors: .*image_encoder is not a folder.*--ip-encoder"),
    _c("generate_ip_image_without_adapter", "generate --ip-image without --ip-adapter",
       lambda r, b: gen(r, b, "--ip-image", _image(r)), r"--ip-image/--ip-scale/--ip-encoder need --ip-adapter MODEL"),
    _c("compare_missing_run", "compare a run folder that does not exist",
       lambda r, b: ["compare", str(r / "output" / "run"), "--prompt", "a lab"],
       r"run does not exist; give the output_dir folders of finished training runs"),
]


def te_only(folder: Path, base: Path) -> None:
    """A valid kohya LoRA on the text encoder's q_proj/v_proj only: A1111 loads it; diffusers 0.42 cannot."""
    from lora_scripts.interop.table import base_configs, module_table

    g, state = torch.Generator().manual_seed(0), {}
    for name, e in module_table(base_configs(base)).items():
        if e.component == "text_encoder" and name.endswith(("q_proj", "v_proj")):
            state[f"{name}.lora_down.weight"] = torch.randn(2, e.shape[1], generator=g) * 0.1
            state[f"{name}.lora_up.weight"] = torch.randn(e.shape[0], 2, generator=g) * 0.1
            state[f"{name}.alpha"] = torch.tensor(2.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "te.safetensors"))


def _base_here(root: Path, base: Path) -> str:
    """The base under root (a link), so the message shows `…/model.safetensors`, not a changing temp path."""
    link = root / "model.safetensors"
    link.symlink_to(base)
    return str(link)


def _with_loha(root: Path) -> str:
    from safetensors.torch import load_file

    path = Path(lora(root))
    state = load_file(str(path))
    state["lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a"] = torch.zeros(2, 2)
    save_file(state, str(path))
    return str(path)


def _rank_mismatch(root: Path) -> str:
    path = Path(lora(root))
    from safetensors.torch import load_file

    state = load_file(str(path))
    key = next(k for k in state if k.endswith("lora_up.weight"))
    state[key] = torch.cat([state[key], state[key]], dim=1)
    save_file(state, str(path))
    return str(path)


def _with_family(root: Path, name: str, family: str) -> str:
    """sd1: a cross-attention key projection reading 768-wide text; sdxl: a module of SDXL's first text encoder
    (lora_te1_), the two marks `inspect` tells families by."""
    module = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" if family == "sd1"
              else "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    fin, fout = (768, 32) if family == "sd1" else (768, 768)
    g = torch.Generator().manual_seed(len(name))
    path = root / name
    save_file({f"{module}.lora_down.weight": torch.randn(4, fin, generator=g),
               f"{module}.lora_up.weight": torch.randn(fout, 4, generator=g), f"{module}.alpha": torch.tensor(4.0)},
              str(path))
    return str(path)
