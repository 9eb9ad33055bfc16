"""The config editor's form, generated from the pydantic TrainConfig: one field per key with its type, default,
one-line help and typical values. Values travel as text, read the way `--set key=value` reads them (YAML), so a
value typed in the browser means exactly what it means on the command line; validation is the CLI's own, and its
messages are sorted to the key they name.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import TrainConfig, config_from_dict, problem_key, resolve_paths
from ..errors import ConfigError
from .workspace import Workspace, config_escapes, path_escapes

# The nine keys every config has come first in TrainConfig; the form shows them open, the rest folded.
ESSENTIAL = ("train_data_dir", "metadata_path", "base_model", "lora_rank", "batch_size", "epochs", "learning_rate",
             "output_dir", "save_steps")


def _kind(annotation: Any) -> tuple[str, list | None]:
    """bool / choice (with its choices) / text. Numbers are text too, so that a wrong one can be typed and
    shown with the CLI's message instead of being blocked by the browser."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool:
        return "bool", None
    if typing.get_origin(annotation) is Literal:
        return "choice", list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    return "text", None


def _is_plain_text(annotation: Any) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a in (str, Path) for a in args)


def form_fields() -> list[dict]:
    fields = []
    for name, info in TrainConfig.model_fields.items():
        if name == "schema_version":
            continue
        kind, choices = _kind(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        default = None if info.is_required() else info.default
        fields.append({"name": name, "kind": kind, "choices": choices, "required": info.is_required(),
                       "default": to_text(default) if kind != "bool" else bool(default),
                       "help": info.description or "", "typical": extra.get("typical"),
                       "essential": name in ESSENTIAL})
    return fields


def to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def form_values(raw: dict[str, Any]) -> dict[str, Any]:
    """A YAML file's keys as the form shows them (bools stay bools, the rest text)."""
    return {k: (v if isinstance(v, bool) else to_text(v)) for k, v in raw.items()}


def parse_values(values: dict[str, Any]) -> dict[str, Any]:
    """Form values -> config keys. Empty text = not set (the default applies). Unknown keys are kept so the
    CLI's 'unknown key, did you mean' message reaches the user."""
    raw: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
            info = TrainConfig.model_fields.get(key)
            if info is None or not _is_plain_text(info.annotation):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass  # left as typed: validation names the key and the bad value
        raw[key] = value
    return raw


def validate_values(values: dict[str, Any], config_dir: Path, ws: Workspace) -> tuple[TrainConfig | None, dict]:
    """Form values -> (config or None, {"fields": {key: [messages]}, "general": [messages]})."""
    return validate_raw(parse_values(values), config_dir, ws)


def validate_raw(raw: dict[str, Any], config_dir: Path, ws: Workspace) -> tuple[TrainConfig | None, dict]:
    """Config keys as a YAML file holds them -> the same as validate_values, plus "outside": the messages of
    paths that leave the workspace (a config with any is never saved nor run by the UI)."""
    fields: dict[str, list[str]] = {}
    general: list[str] = []
    config = None
    try:
        config = config_from_dict(raw, config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            key = problem_key(problem)
            (fields.setdefault(key, []) if key else general).append(problem)
    # Checked on the paths as written too, so that a draft with other mistakes is still refused when it
    # points outside; then on the validated config (templated output_dir filled in, defaults included).
    outside = path_escapes(resolve_paths(raw, Path(config_dir).resolve()), ws.root, raw.get("output_name"),
                           typed=raw)
    if config is not None:
        outside = {**config_escapes(config, ws.root), **outside}
    for key, message in outside.items():
        if not fields.get(key):  # the config module may already have said it (output_name with a '/')
            fields.setdefault(key, []).append(message)
    if fields:
        config = None
    return config, {"fields": fields, "general": general, "outside": list(outside.values())}


def snapshot_yaml(raw: dict[str, Any], config_dir: Path, source: str) -> str:
    """The config a job runs: the keys as validated, with every path made absolute (the copy lives in the job's
    folder, not beside the original), so later edits of the original cannot change what runs."""
    resolved = resolve_paths(raw, Path(config_dir).resolve())
    plain = {k: (str(v) if isinstance(v, Path) else v) for k, v in resolved.items()}
    return f"# the validated copy of {source} this job runs (edits of {source} apply from the next Resume)\n" + \
        yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)


def to_yaml(values: dict[str, Any]) -> str:
    """The form as a config file: set keys only, in TrainConfig's order."""
    fields = TrainConfig.model_fields
    # A checkbox left at its default is not a choice the user made: keep the file to the keys that matter.
    raw = {k: v for k, v in parse_values(values).items()
           if not (isinstance(v, bool) and k in fields and fields[k].default is v)}
    order = list(fields)
    ordered = {k: raw[k] for k in sorted(raw, key=lambda k: order.index(k) if k in order else len(order))}
    return "# written by lora-scripts ui; every key is documented in docs/config.md\n" + \
        yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
