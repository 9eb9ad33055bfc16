"""Metadata for files we derive (converted, resized, combined): what A1111 and civitai read, kept truthful.

A derived file keeps its source's training record (`ss_*`), gets the rank/alpha it really has, a note of what
was done, and freshly computed hashes: a stale `sshs_model_hash` makes A1111 show the wrong model.
"""

from __future__ import annotations

from collections import Counter

from torch import Tensor

from ..families import lora_metadata_for
from ..formats.diffusers import ADAPTER_METADATA_KEY
from ..hashes import modelspec_hash, sshs_hashes
from .lora_file import LoraFile

_STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", ADAPTER_METADATA_KEY, "format")


def derived_metadata(source: LoraFile, result: LoraFile, state: dict[str, Tensor], family: str, note: str
                     ) -> dict[str, str]:
    meta = {k: v for k, v in source.metadata.items() if k not in _STALE}
    # Files of every age say v-prediction one way or another: modelspec, sd-scripts' version string, or the
    # older ss_v_parameterization flag.
    v = (meta.get("modelspec.prediction_type") in ("v", "v_prediction")
         or meta.get("ss_base_model_version", "").endswith("_v") or meta.get("ss_v_parameterization") == "True")
    prediction = "v_prediction" if v else "epsilon"
    meta.update(lora_metadata_for(family, prediction))
    ranks = Counter(m.rank for m in result.modules.values())
    alphas = Counter(float(m.alpha if m.alpha is not None else m.rank) for m in result.modules.values())
    meta["ss_network_module"] = meta.get("ss_network_module", "networks.lora")
    meta["ss_network_dim"] = str(ranks.most_common(1)[0][0])
    meta["ss_network_alpha"] = str(alphas.most_common(1)[0][0])
    if len(ranks) > 1:
        meta["ss_network_args"] = '{"dynamic_rank": "true"}'
    comment = meta.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{comment}; {note}" if comment else note
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(state, meta)
    meta["modelspec.hash_sha256"] = modelspec_hash(state)
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    return meta
