"""The library page's engine: LoRA files found in the workspace, described, and tried out with `<lora:NAME:W>`
prompts through the same Renderer `lora-scripts generate` uses. One base model stays loaded; a LoRA file that
changed on disk since it was loaded (a run trained again) is loaded afresh."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open

from ..interop.describe import describe
from ..generation.lora_lookup import index_loras, is_base_checkpoint
from ..generation.pnginfo import save_png
from ..generation.control import ControlUnit
from ..generation.ip_adapter import IpAdapterUnit
from ..generation.render import Renderer, Settings
from ..generation.sweeps import strength_sweep
from .workspace import STATE_DIR, Workspace


def _is_lora(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            return any("lora" in k for k in f.keys())
    except Exception:
        return False


class Studio:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self._renderer: Renderer | None = None
        self._descriptions: dict[Path, tuple[float, dict]] = {}
        self.lock = threading.Lock()  # one generation at a time: the model is shared

    def _indexed(self) -> dict[str, Path]:
        # A base checkpoint is told by its header, read only inside the workspace (a link leading out is never
        # opened: it is listed as refused).
        skip = lambda path: self.ws.contains(path) and is_base_checkpoint(path)  # noqa: E731
        return {name: path for name, path in index_loras([self.ws.root], skip).items() if STATE_DIR not in path.parts}

    def loras(self) -> dict[str, Path]:
        """LoRA files in the workspace. A link that leads out of it is left out (refused_loras names it): the
        library never describes, serves nor loads a file outside the workspace."""
        return {name: path for name, path in self._indexed().items() if self.ws.contains(path) and _is_lora(path)}

    def refused_loras(self) -> list[dict]:
        return [{"name": name, "path": path.relative_to(self.ws.root).as_posix(),
                 "refused": "a link to a file outside the workspace; not loaded (copy the file into the workspace)"}
                for name, path in sorted(self._indexed().items()) if not self.ws.contains(path)]

    def base_models(self) -> list[str]:
        """Checkpoints in the workspace that are not LoRAs (the toy base, a v1-5-pruned.safetensors, ...) nor one
        of a multi-file base's other files (Flux.1's clip_l, t5xxl, ae: found beside the base when drawing); links
        that lead out of the workspace are left out."""
        from ..families.loading import component_kind

        found = []
        for path in sorted(self.ws.root.rglob("*")):
            if path.suffix not in (".safetensors", ".ckpt") or STATE_DIR in path.parts or "checkpoints" in path.parts:
                continue
            if not self.ws.contains(path) or not path.is_file():
                continue
            if path.suffix == ".ckpt" or not (_is_lora(path) or component_kind(path)):
                found.append(self.ws.rel(path))
        return found

    def describe(self, path: Path) -> dict:
        mtime = path.stat().st_mtime
        cached = self._descriptions.get(path)
        if cached is None or cached[0] != mtime:
            try:
                d = describe(path)
            except Exception as exc:  # one odd file must not take the whole library page down
                return {"path": self.ws.rel(path), "size_bytes": path.stat().st_size, "format": "?", "family": "?",
                        "dtype": "?", "modules": 0, "ranks": {}, "alphas": {}, "trigger_words": [],
                        "warnings": [f"cannot be described: {exc}"], "metadata": {}, "modified": mtime}
            cached = (mtime, {"path": self.ws.rel(path), "size_bytes": d.size_bytes, "format": d.format,
                              "family": d.family, "dtype": d.dtype, "modules": d.modules, "ranks": d.ranks,
                              "alphas": d.alphas, "trigger_words": d.trigger_words, "warnings": d.warnings,
                              "metadata": d.metadata, "modified": mtime})
            self._descriptions[path] = cached
        return cached[1]

    def _renderer_for(self, base: Path, settings: Settings, prediction_type: str = "auto",
                      files: dict[str, Path] | None = None, tokenizer_dir: Path | None = None,
                      guides: tuple[list[ControlUnit], IpAdapterUnit | None] = ([], None)) -> Renderer:
        r, files = self._renderer, files or {}
        controls, ip = guides
        # ControlNets and an IP-Adapter live in the pipeline (and the IP-Adapter in the UNet): other ones, or
        # none after some, take a fresh renderer.
        if (r is None or r.base != base or r.settings.scheduler != settings.scheduler
                or r.prediction_type != prediction_type or r.files != files or r.tokenizer_dir != tokenizer_dir
                or not r.retune(controls, ip)):
            r = self._renderer = None  # the old one's memory is freed before the new one loads
            gc.collect()
            r = self._renderer = Renderer(base, [self.ws.root], settings, prediction_type, files=files,
                                          tokenizer_dir=tokenizer_dir, controls=controls, ip_adapter=ip)
        # Steps and guidance the request leaves open: the model's own (Renderer resolved them on creation).
        r.settings = replace(settings, steps=settings.steps or r.defaults["steps"],
                             cfg=settings.cfg if settings.cfg is not None else r.defaults["cfg"])
        r.index = self.loras()  # LoRAs trained since the last call; LoraSet reloads files changed on disk
        return r

    def generate(self, base: Path, prompt: str, seed: int, settings: Settings, prediction_type: str = "auto",
                 files: dict[str, Path] | None = None, tokenizer_dir: Path | None = None, guides=([], None)) -> str:
        with self.lock:
            renderer = self._renderer_for(base, settings, prediction_type, files, tokenizer_dir, guides)
            rendered = renderer.render(prompt, [seed])[0]
            path = self._new_path()
            save_png(rendered.image, path, rendered.params)
            return self.ws.rel(path)

    def sweep(self, base: Path, prompt: str, seed: int, strengths: list[float], settings: Settings,
              prediction_type: str = "auto", files: dict[str, Path] | None = None,
              tokenizer_dir: Path | None = None, guides=([], None)) -> str:
        with self.lock:
            renderer = self._renderer_for(base, settings, prediction_type, files, tokenizer_dir, guides)
            sheet, _ = strength_sweep(renderer, [prompt], [seed], strengths)
            path = self._new_path()
            sheet.save(path)
            return self.ws.rel(path)

    def _new_path(self) -> Path:
        out = self.ws.state / "generated"
        out.mkdir(exist_ok=True)
        return out / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}.png"
