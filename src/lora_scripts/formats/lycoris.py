"""LoHa and LoKr layers in the LyCORIS key format A1111 (extensions-builtin/Lora network_hada/network_lokr) and
ComfyUI (comfy/weight_adapter loha/lokr) read, and the weight change those loaders compute from them.

Layout per module (kohya name, as for LoRA):
* LoHa: `hada_w1_a` (out, r), `hada_w1_b` (r, in·kh·kw), `hada_w2_a`, `hada_w2_b`, `alpha`;
  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, reshaped to the layer's weight.
* LoKr: `lokr_w1` (or `lokr_w1_a` @ `lokr_w1_b`), `lokr_w2` (or `lokr_w2_a` @ `lokr_w2_b`), `alpha`;
  ΔW = kron(w1, w2) · scale, reshaped to the layer's weight. The loaders' scale is alpha / r, r being the
  inner size of whichever factor is decomposed (w2's where both are), and 1 where neither is: then alpha
  is ignored, so a file written from peft (whose scale is always alpha / r) carries that scale in lokr_w1.

peft's LoHa/LoKr layers (which we train) use the same factor shapes (peft follows LyCORIS), so writing a file is
renaming plus that one scale; `delta` is the loaders' rule, written out here so `verify` can compare it with
what peft applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Parameter-name markers of the adapter layers peft adds (LoRA/LoCon, LoHa, LoKr): what trains and is saved.
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")


def is_adapter_param(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Tucker (CP) cores: read and reported, never written (we train without use_effective_conv2d).
CORE_KEYS = ("hada_t1", "hada_t2", "lokr_t2")


def kind_of(params: set[str]) -> str | None:
    """'loha' / 'lokr' from the parameter names a module has, None for neither."""
    if params & set(LOHA_KEYS):
        return "loha"
    if params & set(LOKR_KEYS):
        return "lokr"
    return None


def lokr_rank(t: dict[str, Tensor]) -> int | None:
    """The loaders' r of a LoKr module: w2's inner size where w2 is decomposed, else w1's, else none."""
    if "lokr_w2_b" in t:
        return t["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in t:
        return t["lokr_w1_b"].shape[0]
    return None


def loader_scale(kind: str, tensors: dict[str, Tensor], alpha: float | None) -> float:
    """The strength-1 scale A1111 and ComfyUI give a module: alpha / r, or 1 where there is no alpha or r."""
    rank = tensors["hada_w1_b"].shape[0] if kind == "loha" else lokr_rank(tensors)
    return alpha / rank if alpha is not None and rank else 1.0


def delta(kind: str, tensors: dict[str, Tensor], alpha: float | None, shape: tuple[int, ...] | None = None) -> Tensor:
    """ΔW at strength 1 in fp32, as the loaders compute it; shaped `shape` (the layer's weight) when given."""
    t = {k: v.float() for k, v in tensors.items()}
    if kind == "loha":
        if "hada_t1" in t:
            raise ValueError("LoHa with Tucker cores (hada_t1/hada_t2) is not supported")
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        if "lokr_t2" in t:
            raise ValueError("LoKr with a Tucker core (lokr_t2) is not supported")
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
    d = d * loader_scale(kind, tensors, alpha)
    return d.reshape(shape) if shape is not None else d


def missing_factor(kind: str, tensors: dict[str, Tensor]) -> str | None:
    """The first factor an incomplete module lacks (every loader skips such a module), or None."""
    if kind == "loha":
        return next((k for k in LOHA_KEYS if k not in tensors), None)
    for w in ("w1", "w2"):
        if f"lokr_{w}" not in tensors and not (f"lokr_{w}_a" in tensors and f"lokr_{w}_b" in tensors):
            return f"lokr_{w}"
    return None


def update_rows_and_size(kind: str, tensors: dict[str, Tensor]) -> tuple[int, int]:
    """(rows, elements) of ΔW, without computing it: what must match the layer's weight."""
    if kind == "loha":
        return tensors["hada_w1_a"].shape[0], tensors["hada_w1_a"].shape[0] * tensors["hada_w1_b"].shape[1]

    def size(name: str) -> tuple[int, int]:
        if f"lokr_{name}" in tensors:
            w = tensors[f"lokr_{name}"]
            return w.shape[0], w.numel()
        a, b = tensors[f"lokr_{name}_a"], tensors[f"lokr_{name}_b"]
        return a.shape[0], a.shape[0] * b[0].numel()

    (r1, n1), (r2, n2) = size("w1"), size("w2")
    return r1 * r2, n1 * n2


def peft_to_lycoris(states: dict[str, dict[str, Tensor]], scales: dict[str, dict[str, tuple[int, float]]],
                    name_of: Callable[[str, str], str],
                    slot_of: Callable[[str, str], tuple[int, tuple[int, ...]] | None] | None = None) -> dict[str, Tensor]:
    """`states`: component -> peft LoHa/LoKr state dict (keys `<module path>.hada_w1_a`, ...); `scales`:
    component -> module path -> (peft's r, alpha) of that layer; name_of: the family's kohya name; slot_of
    (Family.fused_slot): where a layer is one part of a fused kohya module, whose parts were trained with shared
    factors (training.fused_adapters) and are written as one module (formats/fused.fuse_lycoris). Returns the
    LyCORIS kohya keys, every module with its alpha."""
    from .fused import fuse_lycoris

    out: dict[str, Tensor] = {}
    fused: dict[str, tuple[tuple[int, ...], dict[int, dict[str, Tensor]], tuple[int, float]]] = {}
    for component, state in states.items():
        modules: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            path, _, param = key.rpartition(".")
            if param not in LOHA_KEYS + LOKR_KEYS:
                raise ValueError(f"{key!r} is not a peft LoHa/LoKr parameter (Tucker cores are not written)")
            modules.setdefault(path, {})[param] = value
        for path, tensors in modules.items():
            name = name_of(component, path)
            slot = slot_of(component, path) if slot_of else None
            if slot is not None:
                fused.setdefault(name, (slot[1], {}, scales[component][path]))[1][slot[0]] = tensors
            else:
                _write(out, name, tensors, *scales[component][path])
    for name, (ratios, parts, (r, alpha)) in fused.items():
        _write(out, name, fuse_lycoris(ratios, parts), r, alpha)
    return out


def _write(out: dict[str, Tensor], name: str, tensors: dict[str, Tensor], r: int, alpha: float) -> None:
    if kind_of(set(tensors)) == "lokr" and lokr_rank(tensors) is None:
        # Neither factor decomposed: the loaders use scale 1 and ignore alpha, peft used alpha / r.
        tensors = {**tensors, "lokr_w1": tensors["lokr_w1"] * (alpha / r)}
    for param, value in tensors.items():
        out[f"{name}.{param}"] = value
    out[f"{name}.alpha"] = torch.tensor(float(alpha))
