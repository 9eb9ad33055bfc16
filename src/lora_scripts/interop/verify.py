"""Self-test of a LoRA file against its base: is every key applied, by every loader, with the right strength?

Two independent checks:
* by name, the way A1111 and ComfyUI load: each kohya module name must resolve to a weight of the base
  checkpoint's own (LDM) layout, with a matching shape;
* by effect, the way diffusers loads: the file goes through `load_lora_weights`, and the weight change each
  layer then gets (scaling x B @ A, what fuse_lora would add) must equal up @ down x alpha/rank computed
  here, and must not be zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..families.loading import quiet_loading
from ..formats.lycoris import is_adapter_param
from .files import check_base
from .lora_file import LoraFile, LoraModule, nonfinite_tensors, read_lora
from .table import base_configs, base_shapes, module_table
from ..families import LoadSettings, family_for_configs

log = logging.getLogger(__name__)
# fp16 LoRA weights against our fp32 product of the same values: only summation order differs.
_RTOL = 1e-3


@dataclass
class VerifyReport:
    path: Path
    modules: int
    unmatched: list[str] = field(default_factory=list)  # names no A1111/ComfyUI lookup finds
    wrong_shape: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)  # keys a loader would drop
    not_applied: list[str] = field(default_factory=list)  # diffusers left the layer unchanged
    wrong_strength: list[str] = field(default_factory=list)  # applied, but not as alpha/rank says
    zero: bool = False  # every update is zero: the LoRA does nothing
    nonfinite: list[str] = field(default_factory=list)  # tensors holding NaN/inf: every image would be garbage
    partial: list[str] = field(default_factory=list)  # layer groups a loader applies only whole (and skips here)
    max_rel_error: float = 0.0
    notes: list[str] = field(default_factory=list)  # loader limitations worked around (not failures)
    effect_by: str = "by diffusers"  # how the effect was checked, for the summary

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.wrong_shape or self.unknown_keys or self.not_applied
                    or self.wrong_strength or self.zero or self.nonfinite or self.partial)

    def problems(self) -> list[str]:
        out = []
        if self.nonfinite:
            n = len(self.nonfinite)
            out.append(f"{n} weight tensor{'s hold' if n > 1 else ' holds'} NaN or infinite values "
                       f"(e.g. {self.nonfinite[0]}): every image drawn with this LoRA would be black or noise; use an earlier checkpoint")
        for label, items in (("match no layer of the base (A1111/ComfyUI would skip them)", self.unmatched),
                             ("do not fit the base layer's shape", self.wrong_shape),
                             ("are not LoRA weights any loader applies", self.unknown_keys),
                             ("were not applied by diffusers", self.not_applied),
                             ("were applied at the wrong strength", self.wrong_strength)):
            if items:
                out.append(f"{len(items)} modules {label}, e.g. {items[0]}")
        out += self.partial
        if self.zero:
            out.append("every update is zero: the LoRA changes nothing (step 0 weights?)")
        return out

    def summary(self) -> str:
        if self.ok:
            notes = "".join(f"\n  note: {n}" for n in self.notes)
            return (f"{self.path.name}: {self.modules} modules, 0 unmatched keys; every layer applied by name "
                    f"(A1111/ComfyUI) and {self.effect_by}, max deviation {self.max_rel_error:.1e}{notes}")
        return f"{self.path.name} FAILED verification:\n" + "\n".join(f"  - {p}" for p in self.problems())


def verify(lora_path: Path, base_path: Path, loaded=None, files: dict[str, Path] | None = None) -> VerifyReport:
    """loaded: (model, networks) of the base already in memory (see _check_diffusers); files: a base's other
    files, by config key (Flux.1's clip_l, t5xxl, ae)."""
    lora = read_lora(lora_path)
    check_base(Path(base_path))
    report = VerifyReport(Path(lora_path), len(lora.modules) + len(lora.lycoris), unknown_keys=list(lora.unknown))
    configs = base_configs(Path(base_path))
    table = module_table(configs)
    _check_names(lora, Path(base_path), table, family_for_configs(configs), report, files)
    report.zero = all(float(d.abs().max()) == 0.0 for d in lora.deltas().values())
    report.nonfinite = nonfinite_tensors(lora)[0]
    if not report.unmatched and not report.wrong_shape and not report.nonfinite:
        if lora.modules and lora.network_type != "dora":
            _check_diffusers(lora, Path(lora_path), Path(base_path), table, report, loaded, files)
        if lora.by_rule:
            _check_lycoris(lora, table, report, loaded, Path(base_path), files)
    return report


def _check_names(lora: LoraFile, base: Path, table, family, report: VerifyReport, files=None) -> None:
    shapes = base_shapes(base, files)  # a diffusers folder's names in the single-file layout A1111/ComfyUI resolve
    for name, m in sorted({**lora.modules, **lora.lycoris}.items()):
        entry = table.get(name)
        if entry is None or entry.ldm_key not in shapes:
            report.unmatched.append(name)
        elif not m.fits(entry.shape) or tuple(shapes[entry.ldm_key]) != entry.ldm_shape:
            # entry.shape: the layer's; ldm_shape: the single file's weight it lives in (fused q/k/v: 3x the rows)
            report.wrong_shape.append(f"{name}: does not fit {tuple(shapes[entry.ldm_key])}")
    for component in (family.denoiser,) + family.text_encoders:
        paths = [p for n in (*lora.modules, *lora.lycoris) if n in table and table[n].component == component
                 for p in (table[n].path,) + tuple(q for q, _ in table[n].parts[1:])]
        report.partial += family.target_problems(component, paths)


def _load_into(pipe, lora: LoraFile, lora_path: Path, table, report: VerifyReport, networks: tuple[str, ...]) -> None:
    """diffusers' own loader on the file; where diffusers cannot read a valid kohya file (measured with 0.42.1:
    a text-encoder LoRA on q_proj/v_proj only fails with "Could not automatically infer state dict type"), the
    file's diffusers-layout conversion is checked instead and the limitation is noted. diffusers' kohya Flux
    converter also asserts Flux.1's real layer widths (3072, MLP 12288), so a smaller model's file (our tests')
    takes the same route; at the real size it reads our files itself (tests/test_flux.py)."""
    import tempfile

    import diffusers

    from .lora_file import write_diffusers

    try:
        with quiet_loading():
            pipe.load_lora_weights(str(lora_path), adapter_name="verify")
        return
    except (ValueError, AssertionError) as exc:
        if lora.format != "kohya":
            raise
        # The failed load may have left the UNet half of the adapter in place.
        for component in (pipe.components[n] for n in networks):
            if "verify" in getattr(component, "peft_config", {}):
                from peft.tuners.tuners_utils import BaseTunerLayer

                for module in component.modules():
                    if isinstance(module, BaseTunerLayer):
                        module.delete_adapter("verify")
                del component.peft_config["verify"]
        with tempfile.TemporaryDirectory() as tmp:
            converted = write_diffusers(lora, Path(tmp) / "converted.safetensors", table)
            with quiet_loading():
                pipe.load_lora_weights(str(converted), adapter_name="verify")
        why = str(exc) or f"{type(exc).__name__} in its kohya converter"
        report.notes.append(f"diffusers {diffusers.__version__} cannot read this kohya file itself ({why}); A1111 "
                            "and ComfyUI can. For diffusers use save_format: diffusers or `lora-scripts convert "
                            "--to diffusers`, which was checked here")


def _adapter_delta(module: torch.nn.Module, adapter: str, shape: torch.Size) -> torch.Tensor | None:
    """The weight change the loaded adapter applies to this layer (scaling x B @ A, what fuse_lora adds), or None
    when the loader gave the layer none of it."""
    if adapter not in getattr(module, "lora_A", {}):
        return None
    # On the CPU, where the file's expected change is: the loader puts the adapter beside its layer (on the GPU
    # for the self-test at the end of a GPU run).
    a, b = module.lora_A[adapter].weight.float().cpu(), module.lora_B[adapter].weight.float().cpu()
    return (b.flatten(1) @ a.flatten(1)).reshape(shape) * module.scaling[adapter]


def _remove_adapter(networks: dict[str, torch.nn.Module], adapter: str, active: dict[int, list[str]]) -> None:
    """Take the checked adapter out again and re-activate what was active, so a model in use (the self-test
    runs on the trained networks) is left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for net in networks.values():
        for module in net.modules():
            if isinstance(module, BaseTunerLayer) and adapter in module.lora_A:
                module.delete_adapter(adapter)
                if active.get(id(module)):
                    module.set_adapter(active[id(module)])
        getattr(net, "peft_config", {}).pop(adapter, None)


def _applied(parts: dict[str, torch.nn.Module], entry, shape: torch.Size) -> torch.Tensor | None:
    """The weight change the loaded adapter gives a kohya module's layer; for a fused module (Flux's qkv) its
    layers' changes stacked in row order, zero rows for a layer the loader gave none."""
    net = parts[entry.component]
    if not entry.parts:
        return _adapter_delta(net.get_submodule(entry.path), "verify", shape)
    rows = []
    for path, n in entry.parts:
        delta = _adapter_delta(net.get_submodule(path), "verify", torch.Size((n,) + tuple(shape[1:])))
        rows.append(delta if delta is not None else torch.zeros((n,) + tuple(shape[1:])))
    return torch.cat(rows, dim=0) if any(float(r.abs().max()) > 0 for r in rows) else None


def _adapter_dtype(parts: dict[str, torch.nn.Module], entry) -> torch.dtype | None:
    module = parts[entry.component].get_submodule(entry.path)
    return module.lora_A["verify"].weight.dtype if "verify" in getattr(module, "lora_A", {}) else None


@torch.no_grad()
def _check_diffusers(lora: LoraFile, lora_path: Path, base: Path, table, report: VerifyReport, loaded=None,
                     files: dict[str, Path] | None = None) -> None:
    """loaded: (model, networks) already in memory, e.g. the trained ones at the end of a run: the base is then
    not loaded a second time (for SDXL that second copy would not fit a 32 GB host)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..families.loading import load_base_model

    if loaded is None:
        # The objective plays no part in a weight check: an SD2 file that does not say its own is fine here.
        model, networks = load_base_model(base, LoadSettings(weights_only=True, files=files or {})), {}
    else:
        model, networks = loaded
    family = model.family
    names = (family.denoiser,) + family.text_encoders
    parts = {n: networks.get(n, model.modules[n]) for n in names}
    active = {id(m): list(m.active_adapters) for net in parts.values() for m in net.modules()
              if isinstance(m, BaseTunerLayer)}
    # diffusers casts a text encoder it loads an adapter into to the base's dtype, trained LoRA included, and
    # leaves it in eval mode: what a model in use had is put back afterwards (LoRA tensors are small).
    kept = {id(p): (p, p.data.clone()) for net in parts.values() for n, p in net.named_parameters() if is_adapter_param(n)}
    modes = {id(m): (m, m.training) for net in parts.values() for m in net.modules()}
    pipe = family.pipeline(model, model.schedule, parts)
    try:
        _load_into(pipe, lora, lora_path, table, report, names)
        for name, m in sorted(lora.modules.items()):
            # What the file says, in the precision the loader keeps the adapter in (fp16 under an fp16 base): a
            # value rounded once by the loader is its choice, a wrong alpha, scale or layer is an error.
            dtype = _adapter_dtype(parts, table[name])
            expected = (LoraModule(m.down.to(dtype), m.up.to(dtype), m.alpha) if dtype else m).delta()
            norm = float(expected.norm())
            if norm == 0.0:
                continue
            applied = _applied(parts, table[name], expected.shape)
            if applied is None or float(applied.norm()) == 0.0:
                report.not_applied.append(name)
                continue
            rel = float((applied - expected).norm()) / norm
            report.max_rel_error = max(report.max_rel_error, rel)
            if rel > _RTOL:
                report.wrong_strength.append(f"{name} (off by {rel:.1%})")
    finally:
        _remove_adapter(parts, "verify", active)
        for param, data in kept.values():
            param.data = data
        for module, training in modes.values():
            module.training = training  # each module's own flag (train() would recurse into the children)


def _check_lycoris(lora: LoraFile, table, report: VerifyReport, loaded=None, base: Path | None = None,
                   files: dict[str, Path] | None = None) -> None:
    """By effect for LoHa/LoKr/DoRA (diffusers reads none of them as A1111/ComfyUI do): the weight change those
    loaders compute from the file must equal what the trained layer applied, in the run that trained the file;
    a file checked on its own is read a second time by LyCORIS' own modules (interop/lycoris_reference.py,
    the optional extra `lycoris`), which must give the change our tools draw and bake."""
    networks = loaded[1] if loaded is not None else {}
    compared = 0
    for name, m in sorted(lora.by_rule.items()):
        entry = table[name]
        paths = [p for p, _ in entry.parts] or [entry.path]  # a fused module (Flux's qkv): its layers in row order
        layers = [networks[entry.component].get_submodule(p) for p in paths] if entry.component in networks else []
        with torch.no_grad():
            applied = _trained_change(layers, lora.dtype)
        if applied is None:
            continue
        expected = m.delta(tuple(applied.shape)) if name in lora.lycoris else \
            m.applied_delta(torch.cat([layer.get_base_layer().weight.detach().float().cpu() for layer in layers]))
        compared += _compare(name, applied, expected, report)
    if compared:
        report.effect_by = "by A1111/ComfyUI's rule against the trained layers"
        return
    from .lycoris_reference import version

    if base is not None and loaded is None and version() is not None:  # a run's own check never re-reads its base
        compared = _check_against_lycoris(lora, table, report, base, files or {})
    if compared:
        report.effect_by = f"by LyCORIS' own modules (lycoris-lora {version()}) against what generate/merge apply"
        return
    report.effect_by = "its values checked (finite, not all zero)"
    report.notes.append(f"{lora.network_type}: checked by name, shape and values; its effect is checked against "
                        "the trained layers at the end of the run that made it (diffusers reads no LoHa/LoKr/"
                        "input-axis DoRA)" + ("" if version() else "; install the extra `lycoris` (lycoris-lora) "
                                              "to check it by effect on its own"))


def _compare(name: str, applied: torch.Tensor, expected: torch.Tensor, report: VerifyReport) -> int:
    """1 where compared (a module whose change is not zero), after recording its relative deviation."""
    norm = float(expected.norm())
    if norm == 0.0:
        return 0
    rel = float((applied - expected).norm()) / norm
    report.max_rel_error = max(report.max_rel_error, rel)
    if rel > _RTOL:
        report.wrong_strength.append(f"{name} (off by {rel:.1%})")
    return 1


def _check_against_lycoris(lora: LoraFile, table, report: VerifyReport, base: Path, files: dict[str, Path]) -> int:
    """Each module's change as LyCORIS computes it from the file's tensors and the base's weight, against ours
    (formats/lycoris, formats/dora: what generate and merge --base add). The weights are read from the base's
    files one tensor at a time, as merge --base reads them; a module whose weight no file holds is skipped."""
    from .lycoris_reference import reference_change
    from .ops import base_tensors, layer_weight

    tensors = base_tensors(base)[1]
    for path in files.values():  # a base kept as several files (Flux.1's clip_l): their weights too
        if Path(path).is_file() and Path(path).suffix == ".safetensors":
            tensors = {**base_tensors(Path(path))[1], **tensors}
    compared, unbuilt = 0, []
    for name, m in sorted(lora.by_rule.items()):
        try:
            weight = layer_weight(tensors, table[name])
        except KeyError:
            continue
        if name in lora.lycoris:
            keys, ours = dict(m.tensors), m.delta(tuple(weight.shape))
        else:
            keys, ours = {"lora_down.weight": m.down, "lora_up.weight": m.up, "dora_scale": m.dora_scale}, \
                m.applied_delta(weight)
        if m.alpha is not None:
            keys["alpha"] = torch.tensor(float(m.alpha))
        try:
            reference = reference_change(name, keys, weight)
        except Exception:  # LyCORIS rebuilds a LoKr only from its own split of the sizes, and raises what it may
            unbuilt.append(name)
            continue
        compared += _compare(name, ours, reference, report)
    if unbuilt:
        report.notes.append(f"{len(unbuilt)} modules (e.g. {unbuilt[0]}) are laid out in a way LyCORIS' own loader "
                            "cannot rebuild (a LoKr split other than LyCORIS'); A1111 and ComfyUI read them, so they "
                            "were checked by name, shape and values only")
    return compared


def _trained_change(layers: list, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight change trained LoHa/LoKr or DoRA layers apply at strength 1 (fp32, on the CPU), or None; the
    layers of a fused module (their factors shared, training.fused_adapters) stacked in row order, DoRA's norm
    then taken over all of them. DoRA's factors are first rounded to the file's dtype, as the file holds them:
    W' - W0 is small against W0, so an fp16 magnitude alone moves it by tenths of a percent, which is the file's
    precision, not an error."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    from ..formats.dora import PEFT_KEY as DORA_KEY, dora_weight

    def lycoris(layer) -> bool:
        return isinstance(layer, LycorisLayer) and "default" in layer.r

    if any(lycoris(layer) for layer in layers):  # a part without one (not among the targets) adds zero rows
        return torch.cat([layer.get_delta_weight("default").float().cpu() if lycoris(layer)
                          else torch.zeros(layer.weight.shape) for layer in layers])
    if layers and all(isinstance(layer, LoraLayer) and hasattr(layer, DORA_KEY) for layer in layers):
        bases, products = [], []
        for layer in layers:
            base = layer.get_base_layer().weight.detach().float().cpu()
            a, b = (t.detach().cpu().to(dtype).float() for t in (layer.lora_A["default"].weight,
                                                                 layer.lora_B["default"].weight))
            bases.append(base)
            products.append((b.flatten(1) @ a.flatten(1)).reshape(base.shape) * layer.scaling["default"])
        m = getattr(layers[0], DORA_KEY)["default"].detach().cpu().to(dtype).float()
        base = torch.cat(bases)
        return dora_weight(base, torch.cat(products), m) - base
    return None
