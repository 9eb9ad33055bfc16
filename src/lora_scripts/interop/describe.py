"""`lora-scripts inspect`: what a LoRA file holds and what a loader would make of it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .lora_file import LoraFile, read_lora
from ..families import FAMILIES, family_by_label, guess_lora_family, lora_metadata_for
from .table import Entry, family_table, ldm_alias

# The width of the text embedding that cross-attention reads tells the family apart.
_SS_SHOWN = ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
             "ss_network_alpha", "ss_learning_rate", "ss_num_train_images", "ss_epoch", "ss_steps", "ss_resolution",
             "ss_training_comment", "modelspec.architecture", "modelspec.title", "modelspec.prediction_type")


@dataclass
class Description:
    path: str
    size_bytes: int
    format: str
    family: str
    dtype: str
    modules: int
    blocks: dict[str, int]
    ranks: dict[int, int]
    alphas: dict[float, int]
    trigger_words: list[str]
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    network_type: str = "lora"  # lora, loha, lokr (LyCORIS)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def text(self) -> str:
        lines = [f"{self.path}  ({self.size_bytes / 2**20:.2f} MiB)",
                 f"  format      {self.format}", f"  family      {self.family}", f"  type        {self.network_type}",
                 f"  dtype       {self.dtype}",
                 f"  modules     {self.modules}: " + ", ".join(f"{b} {n}" for b, n in self.blocks.items()),
                 "  rank        " + ", ".join(f"{r} ({n} modules)" for r, n in self.ranks.items()),
                 "  alpha       " + ", ".join(f"{a:g} ({n} modules)" for a, n in self.alphas.items())]
        if self.trigger_words:
            lines.append("  tags        " + ", ".join(self.trigger_words))
        shown = {k: v for k, v in self.metadata.items() if k in _SS_SHOWN}
        if shown:
            lines.append("  metadata")
            lines += [f"    {k:<28} {v}" for k, v in shown.items()]
            rest = len(self.metadata) - len(shown)
            if rest:
                lines.append(f"    ... {rest} more keys (--json shows all)")
        lines += [f"  WARNING     {w}" for w in self.warnings] or ["  no problems found"]
        return "\n".join(lines)


def guess_family(lora: LoraFile) -> str:
    """The label of the family the LoRA was trained on ("sd1", "sd2", "sdxl", "unknown (...)")."""
    # Cross-attention k and v read the text embedding: their input width is the text encoder's.
    widths = [m.down.shape[1] for n, m in sorted(lora.modules.items()) if n.endswith(("attn2_to_k", "attn2_to_v"))]
    widths += [m.in_features for n, m in sorted(lora.lycoris.items()) if n.endswith(("attn2_to_k", "attn2_to_v"))]
    return guess_lora_family([*lora.modules, *lora.lycoris], widths, lora.metadata)


def _block(name: str) -> str:
    block = next((b for family in FAMILIES.values() if (b := family.lora_block(name)) is not None), None)
    if block is not None:
        return block
    if name.startswith("lora_te2_"):
        return "text_encoder_2"
    if name.startswith("lora_te"):
        return "text_encoder"
    return "other"


def trigger_words(metadata: dict[str, str], n: int = 10) -> list[str]:
    """The most frequent caption tags of the training set (kohya's ss_tag_frequency), as A1111 shows them."""
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    total: Counter = Counter()
    for tags in freq.values():
        total.update({t: int(c) for t, c in tags.items()})
    return [t for t, _ in total.most_common(n)]


def _warnings(lora: LoraFile, family: str, table: dict[str, Entry] | None) -> list[str]:
    out = []
    if lora.unknown:
        out.append(f"{len(lora.unknown)} keys are not plain LoRA weights and would be dropped by LoRA loaders, "
                   f"e.g. {lora.unknown[0]}")
    no_alpha = [n for n, m in lora.modules.items() if m.alpha is None]
    if no_alpha and lora.format == "kohya":
        out.append(f"{len(no_alpha)} modules have no .alpha: loaders use alpha = rank (strength x1); "
                   "if it was trained with another alpha it will look too strong or too weak")
    bad = [n for n, m in lora.modules.items() if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())]
    if bad:
        out.append(f"{len(bad)} modules hold NaN/inf (e.g. {bad[0]}): the file would break every image")
    if all(float(d.abs().max()) == 0 for d in lora.deltas().values()):
        out.append("every update is zero: the LoRA changes nothing (saved before any training step?)")
    if table is not None:
        names = [*lora.modules, *lora.lycoris]
        unmatched = [n for n in names if n not in table and ldm_alias(n, table) is None]
        if unmatched:
            label = family_by_label(family).label if family_by_label(family) else family
            out.append(f"{len(unmatched)} of {len(names)} module names match no {label} layer; A1111 and "
                       f"ComfyUI would skip them (e.g. {sorted(unmatched)[0]})")
    version = lora.metadata.get("ss_base_model_version", "")
    expected = lora_metadata_for(family).get("ss_base_model_version")
    if version and expected and not version.startswith(expected):
        out.append(f"ss_base_model_version is {version!r} but the weights are {family}: A1111 files it under the "
                   "wrong model family and may hide it")
    dim = lora.metadata.get("ss_network_dim")
    ranks = {m.rank for m in (*lora.modules.values(), *lora.lycoris.values()) if m.rank}
    if dim and dim.isdigit() and ranks and int(dim) not in ranks and "dynamic" not in lora.metadata.get("ss_network_args", ""):
        out.append(f"ss_network_dim says {dim} but the weights have rank {sorted(ranks)}")
    return out


def describe(path: Path) -> Description:
    path = Path(path)
    lora = read_lora(path)
    family = guess_family(lora)
    table = family_table(family)
    every = [*lora.modules.values(), *lora.lycoris.values()]
    alphas = Counter(float(m.alpha if m.alpha is not None else (m.rank or 1)) for m in every)
    ranks = Counter(m.rank if m.rank else "full" for m in every)  # LoKr with no decomposed factor: "full"
    return Description(
        path=str(path), size_bytes=path.stat().st_size, format=lora.format, family=family,
        dtype=str(lora.dtype).removeprefix("torch."), modules=len(every),
        blocks=dict(sorted(Counter(_block(n) for n in (*lora.modules, *lora.lycoris)).items())),
        ranks=dict(sorted(ranks.items(), key=lambda kv: str(kv[0]).zfill(8))),
        alphas=dict(sorted(alphas.items(), key=lambda kv: -kv[1])),
        trigger_words=trigger_words(lora.metadata), metadata=dict(sorted(lora.metadata.items())),
        warnings=_warnings(lora, family, table), network_type=lora.network_type)
