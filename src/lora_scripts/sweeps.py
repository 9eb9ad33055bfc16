"""Labelled grids for choosing a LoRA: one LoRA at several strengths, or several runs side by side."""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from .errors import LoraScriptsError
from .render import Rendered, Renderer
from .sheets import contact_sheet

_FIRST_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")


def with_strength(prompt: str, strength: float) -> tuple[str, str]:
    """The prompt with its first <lora:...> tag set to `strength`, and that LoRA's name."""
    m = _FIRST_TAG.search(prompt)
    if not m:
        raise LoraScriptsError(f"--sweep needs a <lora:NAME> tag in the prompt to sweep; none in {prompt!r}")
    return prompt[: m.start()] + f"<lora:{m[1]}:{strength:g}>" + prompt[m.end():], m[1]


def strength_sweep(renderer: Renderer, prompts: Sequence[str], seeds: Sequence[int],
                   strengths: Sequence[float]) -> tuple[Image.Image, list[Rendered]]:
    """Rows: prompt x seed; columns: strengths. Same seeds in every column, so only the strength differs."""
    grid, rows, done, names = [], [], [], set()
    for prompt in prompts:
        variants = [with_strength(prompt, s) for s in strengths]
        names.update(name for _, name in variants)
        columns = [renderer.render(p, list(seeds)) for p, _ in variants]
        for i, seed in enumerate(seeds):
            grid.append([col[i].image for col in columns])
            rows.append(f"{_strip(prompt)}  (seed {seed})")
        done += [r for col in columns for r in col]
    title = f"strength sweep: {', '.join(sorted(names))}"
    return contact_sheet(grid, rows, [f"strength {s:g}" for s in strengths], title=title), done


def _strip(prompt: str) -> str:
    return _FIRST_TAG.sub("", prompt).strip(" ,")
