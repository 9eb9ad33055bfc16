"""Model captioners, loaded from a local folder or the local Hugging Face cache (never downloaded here).

* BLIP / BLIP-2 (transformers): a sentence per image.
* WD14-style taggers (onnxruntime): `model.onnx` plus `selected_tags.csv` (tag_id,name,category,count) from the
  same folder; the tags above a threshold, comma-separated, most confident first.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.images import open_rgb
from ..errors import LoraScriptsError


class BlipCaptioner:
    def __init__(self, model: str, max_new_tokens: int = 40, device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoProcessor

        if Path(model).exists() and not Path(model).is_dir():
            raise LoraScriptsError(f"--model {model} is a file; BLIP needs the model's folder (config.json, weights, "
                                   "processor files), e.g. a download of Salesforce/blip-image-captioning-large")
        try:
            config = AutoConfig.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise LoraScriptsError(f"--model {model}: no BLIP model there or in the local Hugging Face cache ({exc}). "
                                   "Download it once on a connected machine (e.g. Salesforce/blip-image-"
                                   "captioning-large) and pass its folder.") from None
        if config.model_type == "blip-2":
            from transformers import Blip2ForConditionalGeneration as Model
        elif config.model_type == "blip":
            from transformers import BlipForConditionalGeneration as Model
        else:
            raise LoraScriptsError(f"--model {model} is a {config.model_type!r} model, not BLIP or BLIP-2")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = AutoProcessor.from_pretrained(model, local_files_only=True)
            self.model = Model.from_pretrained(model, local_files_only=True).to(self.device).eval()
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise LoraScriptsError(f"--model {model}: the BLIP model there is incomplete or damaged ({exc}); "
                                   "download it again") from None
        self.max_new_tokens = max_new_tokens

    def __call__(self, path: Path) -> str:
        import torch

        inputs = self.processor(images=open_rgb(path), return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class WD14Tagger:
    RATING, GENERAL, CHARACTER = 9, 0, 4

    def __init__(self, folder: str, threshold: float = 0.35, character_threshold: float = 0.85,
                 underscores_to_spaces: bool = True):
        folder_path = Path(folder)
        model, tags = folder_path / "model.onnx", folder_path / "selected_tags.csv"
        if not folder_path.is_dir():
            raise LoraScriptsError(f"--model {folder}: {'not a folder' if folder_path.exists() else 'no such folder'}; "
                                   "a WD14 tagger folder holds model.onnx and selected_tags.csv")
        if not model.is_file() or not tags.is_file():
            raise LoraScriptsError(f"--model {folder}: a WD14 tagger folder needs model.onnx and selected_tags.csv")
        try:
            import onnxruntime as ort
        except ImportError:
            raise LoraScriptsError("the wd14 backend needs onnxruntime: pip install 'lora-scripts[wd14]'") from None
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(model), providers=providers)
            inp = self.session.get_inputs()[0]
            self.input_name, self.size = inp.name, int(inp.shape[1])  # NHWC, square
        except Exception as exc:  # onnxruntime raises its own exception types for a damaged or foreign model
            raise LoraScriptsError(f"--model {folder}: model.onnx cannot be loaded as a WD14 tagger "
                                   f"({type(exc).__name__}: {exc}); download it again") from None
        try:
            with open(tags, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
            self.names = [r["name"].replace("_", " ") if underscores_to_spaces else r["name"] for r in rows]
            self.categories = [int(r["category"]) for r in rows]
        except (KeyError, ValueError, TypeError, csv.Error) as exc:
            raise LoraScriptsError(f"--model {folder}: selected_tags.csv needs the columns tag_id,name,category,count "
                                   f"with a whole-number category on every row ({type(exc).__name__}: {exc})") from None
        self.threshold, self.character_threshold = threshold, character_threshold

    def preprocess(self, path: Path) -> np.ndarray:
        """As the WD14 models were trained: pad to a white square, resize, BGR, float 0-255, NHWC."""
        im = open_rgb(path)
        side = max(im.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        arr = np.asarray(square.resize((self.size, self.size), Image.Resampling.BICUBIC), dtype=np.float32)
        return arr[None, :, :, ::-1].copy()

    def __call__(self, path: Path) -> str:
        probs = self.session.run(None, {self.input_name: self.preprocess(path)})[0][0]
        picked = [(p, n) for p, n, c in zip(probs, self.names, self.categories)
                  if (c == self.GENERAL and p >= self.threshold) or (c == self.CHARACTER and p >= self.character_threshold)]
        return ", ".join(n for _, n in sorted(picked, key=lambda pn: -pn[0]))
