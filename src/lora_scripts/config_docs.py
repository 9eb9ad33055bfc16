"""Render the config reference (docs/config.md) from the schema, so docs and defaults cannot drift apart."""

from __future__ import annotations

from pydantic_core import PydanticUndefined

from .config import TrainConfig


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default}`" if field.default is not None else "—"


def config_reference() -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from `lora_scripts.config.TrainConfig` by `python -m lora_scripts.config_docs > docs/config.md`.",
        "Paths are relative to the YAML file. Any key can be overridden with `--set key=value`.",
        "",
        "| key | default | what it does | typical |",
        "|---|---|---|---|",
    ]
    for name, field in TrainConfig.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        desc = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {_default(field)} | {desc} | {extra.get('typical', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
