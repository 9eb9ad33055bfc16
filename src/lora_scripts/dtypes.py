"""The one table from the config's precision words to torch dtypes.

save_precision says fp16/bf16/fp32; mixed_precision says no/fp16/bf16, where "no" means full fp32.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")  # what a file may be written in
