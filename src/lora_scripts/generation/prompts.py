"""A1111 prompt syntax for LoRAs: `<lora:NAME:WEIGHT>` tags, removed from the text sent to the encoder.

The one parser of these tags: generation, strength sweeps and training previews all read prompts here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import LoraScriptsError

_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


class PromptError(LoraScriptsError, ValueError):
    """A prompt whose <lora:...> tags cannot be read (a ValueError too, for callers that catch that)."""


@dataclass(frozen=True)
class LoraRef:
    name: str
    weight: float


@dataclass(frozen=True)
class Tag:
    """One `<lora:...>` tag as written: where it is in the prompt, and what it asks for."""
    start: int
    end: int
    ref: LoraRef


def parse_weight(text: str, what: str) -> float:
    """A strength as A1111 reads it: any finite number. `what` names the input in the message."""
    try:
        weight = float(text)
    except ValueError:
        raise PromptError(f"{what}: weight {text!r} is not a number (e.g. 0.8)") from None
    if not math.isfinite(weight):
        # nan/inf parse as floats, but every pixel drawn with them comes out black or noise.
        raise PromptError(f"{what}: weight {text!r} is not a finite number; use a strength such as 0.8")
    return weight


def lora_tags(prompt: str) -> Iterator[Tag]:
    for m in _TAG.finditer(prompt):
        raw = (m[2] or "").strip()
        name = m[1].strip()
        if not name:
            raise PromptError(f"{m[0]!r}: a <lora:NAME:WEIGHT> tag has no name")
        weight = parse_weight(raw, m[0]) if raw else 1.0
        yield Tag(m.start(), m.end(), LoraRef(name, weight))


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """('futuristic lab, <lora:sci_lab:0.8>') -> ('futuristic lab', [LoraRef('sci_lab', 0.8)]). The weight is
    optional (1.0), as in A1111; a tag with an unreadable weight is an error, not silently 1.0."""
    refs = [t.ref for t in lora_tags(prompt)]
    text = _TAG.sub("", prompt)
    if "<lora:" in text:
        # A typo such as a missing '>' would otherwise send the tag's text to the encoder and load nothing.
        bad = text[text.index("<lora:"):][:40]
        raise PromptError(f"{bad!r}: a <lora:NAME:WEIGHT> tag is not closed with '>' or has no name")
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)  # tags removed from a comma list leave empty items
    return text.strip().strip(",").strip(), refs


def without_tags(prompt: str) -> str:
    return _TAG.sub("", prompt).strip(" ,")
