"""Model hashes that A1111, sd-webui-additional-networks and civitai compute for a LoRA, precomputed the way
sd-scripts does so the UI can index the file without rehashing it."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import save as safetensors_bytes


def _tensor_payload(blob: bytes) -> bytes:
    header_len = int.from_bytes(blob[:8], "little")
    return blob[8 + header_len :]


def sshs_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash): SHA-256 of the tensor payload of the file as it would be written
    with only the `ss_*` metadata, and the legacy 8-hex hash of 64 KiB at offset 1 MiB of that file."""
    blob = safetensors_bytes(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = hashlib.sha256(_tensor_payload(blob)).hexdigest()
    legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def addnet_hash(path) -> str:
    """SHA-256 of a .safetensors file's tensor bytes (everything after the header), as A1111's additional-networks
    and its "Lora hashes" compute it; equals sshs_model_hash for files written with only ss_* metadata."""
    with open(path, "rb") as f:
        return hashlib.sha256(_tensor_payload(f.read())).hexdigest()


def modelspec_hash(state: dict[str, torch.Tensor]) -> str:
    """modelspec.hash_sha256: SHA-256 over each tensor's bytes as a one-tensor safetensors payload, in order."""
    h = hashlib.sha256()
    for tensor in state.values():
        h.update(_tensor_payload(safetensors_bytes({"tensor": tensor})))
    return f"0x{h.hexdigest()}"


def file_sha256(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_model_hash(path) -> str:
    """A1111's old 8-hex checkpoint hash (ss_sd_model_hash): SHA-256 of 64 KiB at offset 1 MiB of the file. The
    ControlNet extension names its models by it too (`control_v11p_sd15_canny [d14c016b]`)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]

