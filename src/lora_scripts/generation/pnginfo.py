"""Generation parameters in a PNG's `parameters` text chunk, in A1111's format, so the WebUI's "PNG Info" tab
(and civitai, and ComfyUI's A1111 importer) read how an image was made."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

SAMPLER_LABELS = {"euler_a": "Euler a", "ddim": "DDIM", "dpm++": "DPM++ 2M", "euler": "Euler"}


@dataclass
class Parameters:
    prompt: str  # as the user wrote it, <lora:...> tags included (A1111 keeps them)
    negative: str
    steps: int
    sampler: str
    cfg: float
    seed: int
    size: tuple[int, int]  # (width, height)
    model_name: str
    model_hash: str = ""  # A1111's short hash: the first 10 hex of the checkpoint's SHA-256
    lora_hashes: dict[str, str] = field(default_factory=dict)  # name -> first 12 hex of the addnet hash
    extra: dict[str, str] = field(default_factory=dict)  # e.g. "ControlNet 0" -> the unit, as its extension writes it

    def text(self) -> str:
        fields = [f"Steps: {self.steps}", f"Sampler: {SAMPLER_LABELS.get(self.sampler, self.sampler)}",
                  f"CFG scale: {self.cfg:g}", f"Seed: {self.seed}", f"Size: {self.size[0]}x{self.size[1]}"]
        if self.model_hash:
            fields.append(f"Model hash: {self.model_hash}")
        fields.append(f"Model: {self.model_name}")
        fields += [f"{k}: {_quote(v)}" for k, v in self.extra.items()]
        if self.lora_hashes:
            joined = ", ".join(f"{n}: {h}" for n, h in self.lora_hashes.items())
            fields.append(f'Lora hashes: "{joined}"')
        fields.append("Version: lora-scripts")
        lines = [self.prompt]
        if self.negative:
            lines.append(f"Negative prompt: {self.negative}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _quote(value: str) -> str:
    """A1111's infotext quoting: a value holding a comma, colon or newline is written as a JSON string."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def save_png(image: Image.Image, path: Path, params: Parameters) -> Path:
    from ..atomic import atomic_write

    info = PngInfo()
    info.add_text("parameters", params.text())
    return atomic_write(Path(path), lambda p: image.save(p, format="PNG", pnginfo=info))


def read_parameters(path: Path) -> str | None:
    with Image.open(path) as im:
        return im.text.get("parameters") if hasattr(im, "text") else None


def parse_parameters(text: str) -> dict[str, str]:
    """The reverse, as A1111's PNG Info does: prompt, negative prompt and the `Key: value` fields."""
    lines = text.split("\n")
    out = {"prompt": lines[0]}
    rest = lines[1:]
    if rest and rest[0].startswith("Negative prompt: "):
        out["negative"] = rest.pop(0).removeprefix("Negative prompt: ")
    last = rest[-1] if rest else ""
    buf, in_quotes = "", False
    for ch in last + ",":
        if ch == '"' and not (in_quotes and (len(buf) - len(buf.rstrip("\\"))) % 2):  # an odd run escapes it
            in_quotes = not in_quotes
        if ch == "," and not in_quotes:
            k, _, v = buf.strip().partition(": ")
            if k:
                out[k] = _unquote(v)
            buf = ""
        else:
            buf += ch
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value[1:-1]
    return value
