"""Bad-input cases for train and config: output_name, output folders, YAML keys, templates, --set values,
lora_targets (rows of docs/bad_inputs.md)."""

from __future__ import annotations

from pathlib import Path

from helpers.bad_inputs import Accepted, Command, Refused, _config, _raw_yaml, _tree  # noqa: F401


def _with_run_json(root: Path, base: Path, text: str) -> Path:
    """An output_dir holding a finished run's LoRA whose run.json is damaged."""
    config = _tree(root, base)
    run = root / "output" / "run"
    run.mkdir(parents=True)
    (run / "run.json").write_text(text)
    (run / "run.safetensors").write_bytes(b"a LoRA")
    return config


def _train(*extra: str):
    return lambda r, b: ["train", "--config", str(_tree(r, b)), *extra]


REFUSED: list[Refused] = [
    Refused("output_name_escapes", "output_name with folders (../../x)", lambda r, b: _tree(r, b, output_name="../../x"),
            r"output_name = '\.\./\.\./x': must be a plain file name without folders"),
    Refused("output_name_empty", "output_name that is only dots", lambda r, b: _tree(r, b, output_name=".."),
            r"output_name = '\.\.': must be a file name"),
    Refused("output_in_data", "output_dir inside the training folder",
            lambda r, b: _tree(r, b, output_dir="./data/output"), r"output_dir .* is inside train_data_dir"),
    Refused("data_in_output", "output_dir that holds the training folder", lambda r, b: _tree(r, b, output_dir="."),
            r"train_data_dir .* is inside output_dir"),
    Refused("duplicate_key", "a key set twice in the YAML",
            lambda r, b: _raw_yaml(r, b, "batch_size: 2\nepochs: 1\nepochs: 3\n"),
            r"epochs: set twice \(lines 11 and 12\); YAML would silently keep the second value"),
    Refused("template_attribute", "output_dir template with attribute access",
            lambda r, b: _tree(r, b, output_dir="./output/{seed.__class__}"), r"\{seed\.__class__\} is not a config key"),
    Refused("template_wide", "output_dir template asking for a 50 MB name",
            lambda r, b: _tree(r, b, output_dir="./output/{seed:>50000000}"), r"wider than 32 characters"),
    Refused("template_long", "output_dir template filled in longer than a file name may be",
            lambda r, b: _tree(r, b, output_dir="./output/" + "{lora_rank:032d}" * 7),
            r"bytes long once filled in \(at most 200\)"),
    Refused("template_typo", "output_dir template naming no key",
            lambda r, b: _tree(r, b, output_dir="./output/r{lora_rnak}"), r"\{lora_rnak\} is not a config key \(did you "
            r"mean \{lora_rank\}\?\)"),
    Refused("caption_ext_image", "caption_extension of an image type (.png)",
            lambda r, b: _tree(r, b, caption_extension=".png"), r"caption_extension = '\.png': caption files must be text"),
    Refused("seed_negative", "negative seed", lambda r, b: _tree(r, b, seed=-1), r"seed = -1: Input should be greater"),
    Refused("targets_typo", "lora_targets naming no layer", lambda r, b: _tree(r, b, lora_targets=["to_q", "tyop"]),
            r"'tyop' names no layer of the model"),
    Refused("targets_te_missing", "lora_targets list without text-encoder layers and train_text_encoder: true",
            lambda r, b: _tree(r, b, lora_targets=["to_q", "to_v"], train_text_encoder=True),
            r"train_text_encoder is true, but no name in the list is a text-encoder layer"),
    Refused("prodigy_small_lr", "optimizer: prodigy with an AdamW learning rate (2e-4)",
            lambda r, b: _tree(r, b, optimizer="prodigy", learning_rate=2e-4),
            r"learning_rate = 0\.0002 with optimizer: prodigy: .*set learning_rate: 1\.0"),
    Refused("optimizer_arg_typo", "optimizer_args naming no argument of the optimizer",
            lambda r, b: _tree(r, b, optimizer="lion", optimizer_args={"beta": 0.9}),
            r"optimizer_args\.beta: Lion takes no such argument; it takes betas, .*weight_decay"),
    Refused("schedulefree_schedule", "optimizer: adamw_schedulefree with a cosine schedule",
            lambda r, b: _tree(r, b, optimizer="adamw_schedulefree", lr_scheduler="cosine"),
            r"it replaces the schedule .*set lr_scheduler: constant"),
    Refused("storage_fp16_under_bf16", "frozen weights stored in fp16 while training in bf16",
            lambda r, b: _tree(r, b, base_weight_dtype="fp16", mixed_precision="bf16"),
            r"base_weight_dtype = fp16 with mixed_precision: bf16: fp16 cannot hold every bfloat16 weight"),
    Refused("lora_name_is_folder", "a folder where the LoRA file goes (output/run/run.safetensors/)",
            lambda r, b: ((r / "output" / "run" / "run.safetensors").mkdir(parents=True), _tree(r, b))[1],
            r"run\.safetensors is a folder, and the LoRA is written under that name"),
    Refused("run_json_corrupt", "output_dir whose run.json is damaged", lambda r, b: _with_run_json(r, b, "{\"config_h"),
            r"already holds another run; nothing was changed.*run\.json cannot be read"),
]

def _images_only(root: Path) -> str:
    from helpers.bad_inputs import _images

    _images(root / "data")
    return str(root / "data")


COMMANDS: list[Command] = [
    Command("init_output_folder", "init --output naming a folder",
            lambda r, b: ["init", _images_only(r), "--output", str((r / "out").mkdir() or r / "out"), "--force"],
            r"out is a folder; give a file name"),
    Command("init_output_unwritable", "init --output in a folder nobody may write in",
            lambda r, b: ["init", _images_only(r), "--output", "/sys/starter.yaml"],
            r"Permission denied: /sys/starter\.yaml; choose a folder you own"),
    Command("init_not_a_folder", "init given an image instead of its folder",
            lambda r, b: ["init", _images_only(r) + "/img_00.png"], r"img_00\.png is not a folder"),
    Command("set_unparsable", "--set with a value that is not YAML (lora_rank=[8)", _train("--set", "lora_rank=[8"),
            r"lora_rank = '\[8': not a valid value"),
    Command("set_huge_seed", "--set seed=99999999999", _train("--set", "seed=99999999999"),
            r"seed = 99999999999: Input should be less than or equal to 4294967295"),
    Command("set_no_equals", "--set without '='", _train("--set", "lora_rank"), r"expected key=value"),
    Command("config_missing", "--config naming no file", lambda r, b: ["train", "--config", str(r / "nope.yaml")],
            r"config file .*nope\.yaml does not exist"),
    Command("resume_nothing", "--resume with no checkpoint", _train("--resume"), r"nothing to resume"),
    Command("resume_not_checkpoint", "--resume naming a folder that is not a checkpoint",
            lambda r, b: ["train", "--config", str(_tree(r, b)), "--resume", str(r / "data")],
            r"is not a checkpoint folder \(no training_state\.pt\)"),
]
