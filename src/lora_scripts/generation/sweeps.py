"""Labelled grids for choosing a LoRA: one LoRA at several strengths, or several runs side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image

from ..errors import LoraScriptsError
from .prompts import lora_tags, parse_prompt, without_tags
from .render import Rendered, Renderer
from .sheets import contact_sheet


def with_strength(prompt: str, strength: float) -> tuple[str, str]:
    """The prompt with its first <lora:...> tag set to `strength`, and that LoRA's name."""
    parse_prompt(prompt)  # the whole prompt must read, not only its first tag
    tag = next(lora_tags(prompt), None)
    if tag is None:
        raise LoraScriptsError(f"--sweep needs a <lora:NAME> tag in the prompt to sweep; none in {prompt!r}")
    return prompt[: tag.start] + f"<lora:{tag.ref.name}:{strength:g}>" + prompt[tag.end:], tag.ref.name


def check_strengths(strengths: Sequence[float]) -> None:
    if not strengths:
        raise LoraScriptsError("--sweep: no strengths given; list them separated by commas, e.g. 0,0.4,0.6,0.8,1")
    bad = [s for s in strengths if not math.isfinite(s)]
    if bad:
        raise LoraScriptsError(f"--sweep: strength {bad[0]} is not a finite number; use values such as 0,0.5,1")


def strength_sweep(renderer: Renderer, prompts: Sequence[str], seeds: Sequence[int],
                   strengths: Sequence[float]) -> tuple[Image.Image, list[Rendered]]:
    """Rows: prompt x seed; columns: strengths. Same seeds in every column, so only the strength differs."""
    check_strengths(strengths)
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
    return without_tags(prompt)
