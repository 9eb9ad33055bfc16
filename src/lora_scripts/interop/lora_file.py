"""Read any common SD LoRA file into one in-memory form keyed by kohya module names, and write it back as
kohya (A1111/ComfyUI/sd-scripts) or diffusers/peft.

Formats read: kohya (`lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha`) and diffusers/peft
(`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`, alphas in `lora_adapter_metadata`).
Anything else (LyCORIS LoHa/LoKr, DoRA scales, old attn-processor files) is kept aside as `unknown` so the
tools can say what a loader would drop instead of dropping it silently.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..atomic import atomic_save_safetensors
from ..errors import LoraScriptsError
from ..formats.diffusers import ADAPTER_METADATA_KEY
from ..formats.fused import fuse_slots, split
from ..formats import lycoris
from ..formats.kohya import UNET_PREFIX, join_kohya, split_kohya
from .table import Entry

KOHYA = "kohya"
DIFFUSERS = "diffusers"
_PEFT_KEY = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")


class LoraFileError(LoraScriptsError):
    pass


@dataclass
class LoraModule:
    down: Tensor  # [rank, in] or [rank, in, kh, kw]
    up: Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None = None  # None: the file has no alpha and every loader uses alpha = rank
    dora_scale: Tensor | None = None  # DoRA's input-axis magnitude (formats/dora.py), where the file has one

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def delta(self) -> Tensor:
        """The weight change at strength 1, in fp32, shaped like the base layer's weight."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        if self.down.dim() == 4:
            d = d.reshape(self.up.shape[0], *self.down.shape[1:])
        return d * self.scale

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the update has the layer's weight shape (computed from the factors' shapes alone)."""
        return tuple(update_shape(self)) == tuple(shape)

    def applied_delta(self, base: Tensor) -> Tensor:
        """The change A1111 and ComfyUI make to `base` (the layer's weight W0) at strength 1, in fp32: the LoRA
        product, or for DoRA the decomposed weight minus W0."""
        if self.dora_scale is None:
            return self.delta().reshape(base.shape)
        from ..formats.dora import dora_weight

        return dora_weight(base, self.delta().reshape(base.shape), self.dora_scale) - base.float()


@dataclass
class LycorisModule:
    """A LoHa or LoKr layer as LyCORIS writes it (formats/lycoris.py has the layout and the loaders' rule)."""

    kind: str  # "loha" | "lokr"
    tensors: dict[str, Tensor]  # hada_w1_a, ... / lokr_w1, ... as in the file
    alpha: float | None = None

    def delta(self, shape: tuple[int, ...] | None = None) -> Tensor:
        """The weight change at strength 1, in fp32, as A1111 and ComfyUI compute it; `shape`: the layer's."""
        return lycoris.delta(self.kind, self.tensors, self.alpha, shape)

    @property
    def rank(self) -> int | None:
        """LoHa's r; LoKr's decomposed factor's inner size (None: both factors full)."""
        return self.tensors["hada_w1_b"].shape[0] if self.kind == "loha" else lycoris.lokr_rank(self.tensors)

    @property
    def in_features(self) -> int:
        rows, size = lycoris.update_rows_and_size(self.kind, self.tensors)
        return size // rows

    def fits(self, shape: tuple[int, ...]) -> bool:
        rows, size = lycoris.update_rows_and_size(self.kind, self.tensors)
        return rows == shape[0] and size == math.prod(shape)


@dataclass
class LoraFile:
    modules: dict[str, LoraModule]  # kohya module name -> weights
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = KOHYA
    unknown: list[str] = field(default_factory=list)  # keys no SD LoRA loader would apply as plain LoRA
    dtype: torch.dtype = torch.float16
    lycoris: dict[str, LycorisModule] = field(default_factory=dict)  # LoHa/LoKr layers, by kohya module name

    def components(self) -> Counter:
        return Counter("text_encoder" if n.startswith("lora_te") else "unet" if n.startswith(UNET_PREFIX) else "other"
                       for n in (*self.modules, *self.lycoris))

    @property
    def network_type(self) -> str:
        """lora, dora, loha, lokr (or a + joined mix), what `inspect` reports."""
        dora = any(m.dora_scale is not None for m in self.modules.values())
        kinds = sorted({m.kind for m in self.lycoris.values()} | ({"dora" if dora else "lora"} if self.modules else set()))
        return "+".join(kinds) or "lora"

    @property
    def by_rule(self) -> dict:
        """The modules only A1111/ComfyUI's own rule applies (LoHa, LoKr, DoRA), which diffusers does not read
        as they do: our tools apply them by that rule (formats/lycoris.py, formats/dora.py)."""
        return {**self.lycoris, **{n: m for n, m in self.modules.items() if m.dora_scale is not None}}

    def deltas(self) -> dict[str, Tensor]:
        """Every module's weight change at strength 1 (fp32, LoRA's shaped like its layer, LyCORIS' flat)."""
        return {**{n: m.delta() for n, m in self.modules.items()}, **{n: m.delta() for n, m in self.lycoris.items()}}


def require_plain_lora(lora: LoraFile, path: Path, what: str) -> None:
    """Tools that work on LoRA's down/up factors (convert, resize, merge into a LoRA) refuse LoHa/LoKr by name."""
    if lora.lycoris or lora.network_type == "dora":
        raise LoraFileError(f"{path} is a {lora.network_type} file (LyCORIS); {what} works on LoRA/LoCon files. "
                            "A1111 and ComfyUI load it as it is; `merge --base` bakes it into a checkpoint")


def read_lora(path: Path) -> LoraFile:
    path = Path(path)
    _check_is_file(path)
    try:
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for damaged files
        raise LoraFileError(f"cannot read {path}: {exc}. It is not a complete .safetensors file: truncated (an "
                            "interrupted download or copy?) or another kind of file; copy or download it "
                            "again") from exc
    if any(_PEFT_KEY.match(k) for k in state):
        lora = _from_peft(state, metadata)
    else:
        lora = _from_kohya(state, metadata)
    if not lora.modules and not lora.lycoris:
        hint = (" It looks like a full model checkpoint, not a LoRA." if len(state) > 100 or any(
            k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in state) else "")
        raise LoraFileError(f"{path} holds no LoRA weights this tool understands "
                            f"({len(state)} keys, e.g. {sorted(state)[:2]}).{hint}")
    _check_modules(lora, path)
    floats = [v.dtype for m in lora.modules.values() for v in (m.down, m.up)] + \
        [v.dtype for m in lora.lycoris.values() for v in m.tensors.values()]
    lora.dtype = Counter(floats).most_common(1)[0][0]
    return lora


def _check_is_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise LoraFileError(f"{path} is a folder, not a LoRA file; give the .safetensors file itself{hint}")
    if not path.is_file():
        raise LoraFileError(f"{path} does not exist; check the path (LoRA files end in .safetensors)")
    if path.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth"):
        # Pickled files can run code when loaded; every current trainer and loader writes .safetensors.
        raise LoraFileError(f"{path} is a pickled {path.suffix} file; only .safetensors LoRA files are read "
                            "(pickles can run code when opened). Use the .safetensors version of this LoRA")


def _check_modules(lora: LoraFile, path: Path) -> None:
    """Shapes that no loader can apply: up and down of different ranks, rank 0, odd dimensions, a non-scalar
    alpha. One message for the file, so every later step can trust `m.rank` and `m.delta()`."""
    bad = []
    for name, m in sorted(lora.modules.items()):
        if m.down.dim() not in (2, 4) or m.up.dim() != m.down.dim():
            bad.append(f"{name}: lora_down {tuple(m.down.shape)} and lora_up {tuple(m.up.shape)} are not a LoRA pair")
        elif m.down.shape[0] == 0 or m.up.shape[1] != m.down.shape[0]:
            bad.append(f"{name}: lora_down has rank {m.down.shape[0]} but lora_up has rank {m.up.shape[1]}")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise LoraFileError(f"{path} is damaged: {bad[0]}{more}. No loader can apply it; use another copy or "
                            "an earlier checkpoint")


def nonfinite_tensors(lora: LoraFile) -> tuple[list[str], int]:
    """Names of the weight tensors holding NaN or infinity, and how many tensors there are in all."""
    bad, total = [], 0
    for name, m in sorted(lora.modules.items()):
        for suffix, t in (("lora_down.weight", m.down), ("lora_up.weight", m.up)):
            total += 1
            if not bool(torch.isfinite(t).all()):
                bad.append(f"{name}.{suffix}")
        if m.alpha is not None:
            total += 1
            if not math.isfinite(m.alpha):
                bad.append(f"{name}.alpha")
    for name, m in sorted(lora.modules.items()):
        if m.dora_scale is not None:
            total += 1
            if not bool(torch.isfinite(m.dora_scale).all()):
                bad.append(f"{name}.dora_scale")
    for name, m in sorted(lora.lycoris.items()):
        for suffix, t in m.tensors.items():
            total += 1
            if not bool(torch.isfinite(t).all()):
                bad.append(f"{name}.{suffix}")
    return bad, total


def require_finite(lora: LoraFile, path: Path) -> None:
    """Refuse a file with NaN/inf weights: every image drawn with it, and every file made from it, is garbage."""
    bad, total = nonfinite_tensors(lora)
    if bad:
        raise LoraFileError(f"{path}: {len(bad)} of {total} weight tensors {_hold(len(bad))} NaN or infinite "
                            f"values (first: {bad[0]}); it would turn every image black or into noise. Training went unstable "
                            "before it was saved: use an earlier checkpoint, or train again with a lower learning_rate")


def _hold(n: int) -> str:
    return "holds" if n == 1 else "hold"


def shape_problems(lora: LoraFile, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """Against a model's layers (kohya name -> weight shape): modules with no such layer, and modules whose
    update does not fit the layer (a LoRA for another model family)."""
    unmatched, wrong = [], []
    for name, m in sorted(lora.modules.items()):
        if name not in shapes:
            unmatched.append(name)
        elif tuple(update_shape(m)) != tuple(shapes[name]):
            wrong.append(f"{name}: {tuple(update_shape(m))} vs the model's {tuple(shapes[name])}")
    for name, m in sorted(lora.lycoris.items()):
        if name not in shapes:
            unmatched.append(name)
        elif not m.fits(tuple(shapes[name])):
            rows, size = lycoris.update_rows_and_size(m.kind, m.tensors)
            wrong.append(f"{name}: {rows} rows, {size} values vs the model's {tuple(shapes[name])}")
    return unmatched, wrong


def update_shape(m: LoraModule) -> tuple[int, ...]:
    """The shape of up @ down, without computing it."""
    return (m.up.shape[0], *m.down.shape[1:])


def _from_kohya(state: dict[str, Tensor], metadata: dict[str, str]) -> LoraFile:
    found, rest = _lycoris_parts(state)
    dora = {k.removesuffix(".dora_scale"): rest.pop(k) for k in [k for k in rest if k.endswith(".dora_scale")]}
    parts, unknown = split_kohya(rest)  # a LyCORIS module's alpha lands here, with no down/up
    modules, lyco = {}, {}
    for name, tensors in found.items():
        alpha = parts.pop(name, {}).get("alpha")
        if any(k in tensors for k in lycoris.CORE_KEYS):  # Tucker cores: loaders apply them; we do not read them
            unknown += [f"{name}.{k} (LyCORIS Tucker decomposition: not read by this tool)" for k in tensors]
            continue
        missing = lycoris.missing_factor(lycoris.kind_of(set(tensors)), tensors)
        if missing:  # an incomplete LoHa/LoKr layer: every loader skips it
            unknown += [f"{name}.{k} (its {missing} is missing)" for k in tensors]
            continue
        lyco[name] = LycorisModule(lycoris.kind_of(set(tensors)), tensors,
                                   float(alpha) if alpha is not None and alpha.numel() == 1 else None)
    for name, p in parts.items():
        if "down" in p and "up" in p:
            if "alpha" in p and p["alpha"].numel() != 1:
                unknown.append(f"{name}.alpha (holds {p['alpha'].numel()} values, not one)")
                p.pop("alpha")
            modules[name] = LoraModule(p["down"], p["up"], float(p["alpha"]) if "alpha" in p else None)
        else:
            unknown += [f"{name}.{k} (its partner is missing)" for k in p]
    for name, scale in dora.items():
        width = modules[name].down.shape[1] if name in modules else None
        if width is not None and scale.dim() >= 2 and scale.shape[0] == 1 and scale.shape[1] == width:
            modules[name].dora_scale = scale
        elif width is not None and scale.dim() >= 2 and scale.shape[1] == 1:
            unknown.append(f"{name}.dora_scale (an output-axis DoRA magnitude: A1111 and ComfyUI apply it "
                           "differently; this tool does not read it)")
        else:
            unknown.append(f"{name}.dora_scale (no LoRA layer of its width)")
    return LoraFile(modules, metadata, KOHYA, sorted(unknown), lycoris=lyco)


def _lycoris_parts(state: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """LoHa/LoKr parameters by module (name -> {param: tensor}), and every other key."""
    found: dict[str, dict[str, Tensor]] = {}
    rest = {}
    names = lycoris.LOHA_KEYS + lycoris.LOKR_KEYS + lycoris.CORE_KEYS
    for key, value in state.items():
        name, _, param = key.partition(".")
        if param in names:
            found.setdefault(name, {})[param] = value
        else:
            rest[key] = value
    return found, rest


def _peft_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """Per component: lora_alpha, r, alpha_pattern as diffusers' save_lora_weights stores them."""
    if ADAPTER_METADATA_KEY not in metadata:
        return {}
    packed = json.loads(metadata[ADAPTER_METADATA_KEY])
    out: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field_name = key.partition(".")
        out.setdefault(component, {})[field_name] = value
    return out


def _from_peft(state: dict[str, Tensor], metadata: dict[str, str]) -> LoraFile:
    configs = _peft_alphas(metadata)
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m:
            parts.setdefault((m[1], m[2]), {})[m[3]] = value
        else:
            unknown.append(key)
    family = _peft_family(parts, metadata)
    modules = {}
    fused: dict[str, tuple[tuple[int, ...], dict[int, tuple[Tensor, Tensor, float]]]] = {}
    for (component, path), p in parts.items():
        if "A" not in p or "B" not in p:
            unknown += [f"{component}.{path}.lora_{k}.weight (its partner is missing)" for k in p]
            continue
        cfg = configs.get(component, {})
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha"))
        slot = family.fused_slot(component, path)
        if slot is not None:  # one part of a layer the kohya layout fuses (Flux's q/k/v): fused below
            a = float(alpha) if alpha is not None else float(p["A"].shape[0])
            fused.setdefault(family.kohya_name(component, path), (slot[1], {}))[1][slot[0]] = (p["A"], p["B"], a)
            continue
        modules[family.kohya_name(component, path)] = LoraModule(p["A"], p["B"], None if alpha is None else float(alpha))
    for name, (ratios, group) in fused.items():
        try:
            modules[name] = LoraModule(*fuse_slots(ratios, group))
        except ValueError as exc:  # parts of unequal rank: kept apart, reported rather than guessed
            unknown.append(f"{name} ({exc})")
    return LoraFile(modules, metadata, DIFFUSERS, sorted(unknown))


def _peft_family(parts: dict[tuple[str, str], dict[str, Tensor]], metadata: dict[str, str]):
    """The family whose kohya names a diffusers-layout file's modules get (SDXL's differ from SD1's): told by a
    second text encoder, the cross-attention width or the metadata; SD1 when nothing tells."""
    from ..families import FAMILIES, default_family, family_by_label, guess_lora_family

    components = {c for c, _ in parts}
    # A denoiser component only one family has (Flux.1's "transformer") names the family; "unet" is shared.
    own = [f for f in FAMILIES.values() if f.denoiser in components
           and sum(g.denoiser == f.denoiser for g in FAMILIES.values()) == 1]
    if own:
        return own[0]
    second = ["lora_te2_"] if any(c == "text_encoder_2" for c, _ in parts) else []
    widths = [p["A"].shape[1] for (c, path), p in sorted(parts.items())
              if c == "unet" and path.endswith(("attn2.to_k", "attn2.to_v")) and "A" in p]
    return family_by_label(guess_lora_family(second, widths, metadata)) or default_family()


def _pattern_value(patterns: dict[str, float], path: str, default):
    """peft's rule: a pattern applies to a module whose path equals it or ends with '.' + it."""
    for pattern, value in patterns.items():
        if path == pattern or path.endswith("." + pattern):
            return value
    return default


# --- writing ------------------------------------------------------------------------------------------------
def kohya_state(lora: LoraFile, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every module gets an explicit `.alpha` (= rank where the source had none: the same strength)."""
    dtype = dtype or lora.dtype
    modules = {name: (m.down, m.up, m.alpha if m.alpha is not None else m.rank) for name, m in sorted(lora.modules.items())}
    return {k: v.to(dtype).contiguous() for k, v in join_kohya(modules).items()}


def write_kohya(lora: LoraFile, path: Path, metadata: dict[str, str] | None = None,
                dtype: torch.dtype | None = None) -> Path:
    return atomic_save_safetensors(kohya_state(lora, dtype), path, metadata if metadata is not None else lora.metadata)


def diffusers_state(lora: LoraFile, table: dict[str, Entry], dtype: torch.dtype | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """peft keys, with each component's LoraConfig in `lora_adapter_metadata`: the most common rank and alpha,
    plus rank_pattern/alpha_pattern for modules that differ, so every alpha survives exactly."""
    dtype = dtype or lora.dtype
    missing = sorted(n for n in lora.modules if n not in table)
    if missing:
        raise LoraFileError(f"{len(missing)} modules match no layer of the model (first: {missing[0]}); "
                            "cannot name them in diffusers layout")
    state: dict[str, Tensor] = {}
    by_component: dict[str, dict[str, LoraModule]] = {}
    for name, m in sorted(lora.modules.items()):
        e = table[name]
        if e.parts:  # a fused kohya module (Flux's qkv): one peft LoRA per layer it holds
            pieces = split(m.down, m.up, m.alpha if m.alpha is not None else float(m.rank), [n for _, n in e.parts])
            layers = [((path, _), LoraModule(*piece)) for (path, _), piece in zip(e.parts, pieces) if piece is not None]
        else:
            layers = [((e.path, None), m)]
        for (path, _), part in layers:
            state[f"{e.component}.{path}.lora_A.weight"] = part.down.to(dtype).contiguous()
            state[f"{e.component}.{path}.lora_B.weight"] = part.up.to(dtype).contiguous()
            by_component.setdefault(e.component, {})[path] = part
    packed = {}
    for component, mods in by_component.items():
        alphas = {p: float(m.alpha if m.alpha is not None else m.rank) for p, m in mods.items()}
        ranks = {p: m.rank for p, m in mods.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        packed.update({
            f"{component}.r": r, f"{component}.lora_alpha": alpha, f"{component}.target_modules": sorted(mods),
            f"{component}.rank_pattern": {p: v for p, v in ranks.items() if v != r},
            f"{component}.alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
            f"{component}.lora_dropout": 0.0, f"{component}.use_dora": False, f"{component}.use_rslora": False,
        })
    return state, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def write_diffusers(lora: LoraFile, path: Path, table: dict[str, Entry], dtype: torch.dtype | None = None,
                    extra_metadata: dict[str, str] | None = None) -> Path:
    """extra_metadata (e.g. the source's ss_* training record) rides along; diffusers reads only its own key."""
    state, metadata = diffusers_state(lora, table, dtype)
    return atomic_save_safetensors(state, path, {**(extra_metadata or {}), **metadata})
