"""What a model family is: its name, how to recognise its checkpoints, its configs and its metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


@dataclass(frozen=True)
class Family:
    name: str  # our id, e.g. "sd15"
    label: str  # what users call it, for messages
    supported: bool  # False: detected so we can say so clearly, but not trainable yet
    base_model_version: str  # kohya's ss_base_model_version; A1111 files a LoRA by it
    v2: bool  # kohya's ss_v2
    modelspec_architecture: str  # modelspec.architecture for the LoRA we write
    config_package: str | None = None  # package holding unet.json, vae.json, ...

    def embedded_configs(self) -> dict[str, dict[str, Any]]:
        """Real-size component configs shipped in the package, so nothing is fetched from a hub."""
        if self.config_package is None:
            raise ValueError(f"{self.label} has no embedded configs")
        root = resources.files(self.config_package)
        return {c: json.loads(root.joinpath(f"{c}.json").read_text()) for c in COMPONENTS}
