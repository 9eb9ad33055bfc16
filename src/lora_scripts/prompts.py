"""A1111 prompt syntax for LoRAs: `<lora:NAME:WEIGHT>` tags, removed from the text sent to the encoder."""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


@dataclass(frozen=True)
class LoraRef:
    name: str
    weight: float


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """('futuristic lab, <lora:sci_lab:0.8>') -> ('futuristic lab', [LoraRef('sci_lab', 0.8)]). The weight is
    optional (1.0), as in A1111; a tag with an unreadable weight is an error, not silently 1.0."""
    refs = []
    for m in _TAG.finditer(prompt):
        raw = (m[2] or "").strip()
        try:
            weight = float(raw) if raw else 1.0
        except ValueError:
            raise ValueError(f"{m[0]}: weight {raw!r} is not a number (e.g. <lora:{m[1]}:0.8>)") from None
        refs.append(LoraRef(m[1].strip(), weight))
    text = _TAG.sub("", prompt)
    if "<lora:" in text:
        # A typo such as a missing '>' would otherwise send the tag's text to the encoder and load nothing.
        bad = text[text.index("<lora:"):][:40]
        raise ValueError(f"{bad!r}: a <lora:NAME:WEIGHT> tag is not closed with '>' or has no name")
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)  # tags removed from a comma list leave empty items
    return text.strip().strip(",").strip(), refs
