"""Captions longer than CLIP's 75 tokens, as sd-scripts' max_token_length (150 or 225) reads them: the caption is
tokenized to 75 x N tokens, cut into N windows of 75, each window encoded as its own 77-token prompt
(start + 75 + end), and the hidden states joined again as start, N x 75, end (1 + 75 N + 1 positions).

Written here because no library does it for training: diffusers' pipelines truncate at 77 and compel works at
inference only. The pooled embedding (SDXL) is the first window's, as sd-scripts takes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

WINDOW = 75  # tokens a CLIP prompt holds between its start and end tokens


def chunked_ids(tokenizer, captions: list[str], chunks: int) -> Tensor:
    """(batch, chunks, 77) token ids: each window framed by the start and end tokens. With OpenCLIP's "!" padding a
    window that ends inside the caption gets an end token, and a window holding only padding starts with one
    (sd-scripts' get_input_ids does the same)."""
    length = WINDOW * chunks + 2
    ids = tokenizer(captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, length - 1, WINDOW):
        window = torch.cat([ids[:, :1], ids[:, start:start + WINDOW], ids[:, -1:]], dim=1)
        if pad != eos:
            cut = (window[:, -2] != eos) & (window[:, -2] != pad)
            window[cut, -1] = eos
            window[window[:, 1] == pad, 1] = eos
        windows.append(window)
    return torch.stack(windows, dim=1)


def join_windows(hidden: Tensor, batch: int) -> Tensor:
    """(batch x chunks, 77, width) hidden states of the windows -> (batch, 1 + 75 x chunks + 1, width): the first
    start token, every window's 75 inner positions, the last end token."""
    per = hidden.reshape(batch, -1, hidden.shape[-2], hidden.shape[-1])  # (batch, chunks, 77, width)
    inner = per[:, :, 1:-1].reshape(batch, -1, hidden.shape[-1])
    return torch.cat([per[:, 0, :1], inner, per[:, -1, -1:]], dim=1)
