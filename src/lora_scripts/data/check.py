"""`lora-scripts check`: a pre-flight report on a config's dataset and settings, in seconds, before any GPU
time is spent. Errors stop `train`; warnings and advice are printed and training goes on.

The advice follows the guidance creators are given for SD LoRAs (rank 8 for a simple style, 16 for complex
multi-object scenes; 10-20 epochs; learning rate 2e-4 as a start; 50 precise images beat 150 vague ones) and
is worded as advice, not rules.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import TrainConfig
from ..errors import DatasetError
from .images import list_images, open_rgb
from .scan import Sample, collect, no_images_hint

ERROR, WARNING, ADVICE = "error", "warning", "advice"
# Two images whose 64-bit difference hashes differ in at most this many bits look the same at a glance.
NEAR_DUPLICATE_BITS = 4
MIN_CONTENT_WORDS = 4
MAX_ASPECT = 2.5
_STOP = set("a an the of in on at with and or to for by from is are this that its it as into over under near".split())
_GENERIC = {"image", "photo", "picture", "a lab", "lab", "art", "artwork", "illustration", "render", "style"}


@dataclass
class Finding:
    level: str  # error | warning | advice
    topic: str  # images | captions | settings | memory
    message: str
    files: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.level == ERROR for f in self.findings)

    def add(self, level: str, topic: str, message: str, files=()) -> None:
        self.findings.append(Finding(level, topic, message, [str(f) for f in files]))

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "findings": [asdict(f) for f in self.findings], "stats": self.stats},
                          indent=2, default=str)

    def text(self) -> str:
        s = self.stats
        lines = [f"dataset: {s.get('images', 0)} usable images"
                 + "".join(f"\n  {folder}: {n} images" for folder, n in s.get("per_folder", {}).items())]
        if "steps_per_epoch" in s:
            lines.append(f"schedule: {s['steps_per_epoch']} steps per epoch, {s['total_steps']} steps in all")
        if s.get("top_tags"):
            lines.append("most frequent caption tags: " + ", ".join(f"{t} ({n})" for t, n in s["top_tags"][:12]))
        if "memory" in s:
            lines.append(f"memory: {s['memory']['summary']}")
        for level in (ERROR, WARNING, ADVICE):
            items = [f for f in self.findings if f.level == level]
            if items:
                lines.append(f"\n{ {ERROR: 'ERRORS', WARNING: 'WARNINGS', ADVICE: 'ADVICE'}[level]} ({len(items)})")
                lines += [f"  [{f.topic}] {f.message}" for f in items]
        lines.append("\nno errors: ready to train" if self.ok else "\nfix the errors above before training")
        return "\n".join(lines)


# --- images ------------------------------------------------------------------------------------------------
def fingerprint(path: Path) -> tuple[int, np.ndarray]:
    """A 64-bit difference hash (brightness gradients of a 9x8 thumbnail; survives resizing and recompression)
    and an 8x8 colour thumbnail: flat images of different colours share a hash but not their colours."""
    rgb = open_rgb(path)  # as trained: rotated, 16-bit and float images scaled, transparency on white
    small = np.asarray(rgb.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    colours = np.asarray(rgb.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2), colours


def near_duplicates(a: tuple[int, np.ndarray], b: tuple[int, np.ndarray]) -> bool:
    return bin(a[0] ^ b[0]).count("1") <= NEAR_DUPLICATE_BITS and float(np.abs(a[1] - b[1]).mean()) < 12.0


def _image_findings(samples: list[Sample], config: TrainConfig, report: CheckReport) -> None:
    res = config.resolution
    small = [s for s in samples if min(s.size) < res]
    for s in small:
        short = min(s.size)
        report.add(WARNING, "images", f"{s.path.name}: {s.size[0]}x{s.size[1]} is smaller than resolution {res} "
                   f"(short side {100 * (res - short) / res:.0f}% below); it will be upscaled", [s.path])
    for s in samples:
        ratio = max(s.size) / min(s.size)
        if ratio > MAX_ASPECT:
            report.add(WARNING, "images", f"{s.path.name}: aspect ratio {ratio:.1f}:1; buckets stop at "
                       f"{MAX_ASPECT}:1, so much of it is cropped away", [s.path])
    by_bytes: dict[str, list[Path]] = defaultdict(list)
    hashes = []
    for s in samples:
        by_bytes[hashlib.sha256(s.path.read_bytes()).hexdigest()].append(s.path)
        hashes.append((s.path, fingerprint(s.path)))
    exact = [paths for paths in by_bytes.values() if len(paths) > 1]
    for paths in exact:
        report.add(WARNING, "images", f"exact duplicates: {', '.join(p.name for p in paths)} (each copy is trained "
                   "again, like an extra repeat)", paths)
    same_file = {p for paths in exact for p in paths[1:]}
    for i, (a, ha) in enumerate(hashes):
        for b, hb in hashes[i + 1:]:
            if b in same_file or a in same_file:
                continue
            if near_duplicates(ha, hb):
                report.add(WARNING, "images", f"near duplicates: {a.name} and {b.name} look the same (perceptual "
                           "hash); keep the better one unless the difference matters", [a, b])
    report.stats["per_folder"] = dict(Counter(s.path.parent.name for s in samples))


def _orphans(samples: list[Sample], config: TrainConfig, report: CheckReport) -> None:
    """Images in the folder that metadata.csv does not name are silently not trained: say so."""
    if not config.metadata_path:
        return
    named = {s.path.resolve() for s in samples}
    images = list_images(config.train_data_dir)
    missing = sorted(p for p in images if p.resolve() not in named)
    if missing:
        report.add(WARNING, "captions", f"{len(missing)} images have no row in {config.metadata_path.name} and are "
                   f"not trained: {', '.join(p.name for p in missing[:8])}", missing)


# --- captions ---------------------------------------------------------------------------------------------
def _token_findings(samples: list[Sample], config: TrainConfig, report: CheckReport) -> None:
    """Captions longer than the text encoder reads are cut at its limit in training: the words at the end (often
    the trigger word or the style) are silently lost. Counted with the tokenizer the base model's family reads
    captions with (CLIP for SD, T5 for Flux)."""
    limit = _caption_limit(config)
    if limit is None or not samples:
        return
    ids = limit.tokenizer([s.caption for s in samples], add_special_tokens=False, truncation=False,
                          verbose=False)["input_ids"]
    long = [(i, len(t)) for i, t in enumerate(ids) if len(t) > limit.tokens]
    if not long:
        return
    files = [_caption_file(samples[i], config) for i, _ in long]
    lost = sum(n - limit.tokens for _, n in long)
    shown = ", ".join(f"{f.name} ({n} tokens)" for f, (_, n) in zip(files[:5], long[:5]))
    report.add(WARNING, "captions", f"{len(long)} captions are longer than the {limit.tokens} tokens {limit.reader} "
               f"reads; training cuts off their ends ({lost} tokens lost in all): {shown}"
               + (f" and {len(long) - 5} more" if len(long) > 5 else "")
               + ". Shorten them, put the words that matter (trigger word first) at the start"
               + (f", or {limit.more}" if limit.more else ""), files)


def _caption_limit(config: TrainConfig):
    """The base's family's CaptionLimit; SD1's CLIP where the base cannot be read (training reports that)."""
    from ..errors import ModelLoadError
    from ..families import default_family
    from ..families.loading import base_family
    from ..training.trainer import load_settings

    base = Path(config.base_model) if config.base_model else None
    try:
        family = base_family(base)[0] if base is not None else default_family()
    except ModelLoadError:
        family = default_family()
    return family.caption_limit(base, load_settings(config), config.max_token_length)


def _caption_file(sample: Sample, config: TrainConfig) -> Path:
    """The caption's own file, or the image for a row of metadata.csv."""
    from .captions import sidecar_for

    return sample.path if config.metadata_path else sidecar_for(sample.path, config.caption_extension)


def content_words(caption: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9']+", caption.lower()) if w not in _STOP]


def tags(caption: str) -> list[str]:
    return [t.strip().lower() for t in caption.split(",") if t.strip()]


def _caption_findings(samples: list[Sample], config: TrainConfig, trigger: str | None, report: CheckReport) -> None:
    by_caption: dict[str, list[Path]] = defaultdict(list)
    for s in samples:
        by_caption[s.caption.strip().lower()].append(s.path)
        words = content_words(s.caption)
        if len(words) < MIN_CONTENT_WORDS or s.caption.strip().lower() in _GENERIC:
            report.add(WARNING, "captions", f"{s.path.name}: caption {s.caption!r} is too short or generic "
                       f"({len(words)} content words); describe subject, environment, lighting and style, e.g. "
                       "'cyberpunk laboratory with glowing blue consoles and robotic arms under neon lighting'",
                       [s.path])
    for caption, paths in by_caption.items():
        if len(paths) > 1:
            report.add(WARNING, "captions", f"{len(paths)} images share the caption {caption!r}: "
                       f"{', '.join(p.name for p in paths[:6])}; the model cannot tell them apart", paths)
    freq = Counter(t for s in samples for t in tags(s.caption))
    report.stats["top_tags"] = freq.most_common(20)
    firsts = Counter(tags(s.caption)[0] for s in samples if tags(s.caption))
    if trigger is None and firsts:
        word, n = firsts.most_common(1)[0]
        trigger = word if n >= 0.6 * len(samples) and n < len(samples) else None
    if trigger:
        lacking = [s.path for s in samples if trigger.lower() not in s.caption.lower()]
        report.stats["trigger"] = trigger
        if lacking:
            report.add(WARNING, "captions", f"{len(lacking)} captions lack the trigger word {trigger!r}: "
                       f"{', '.join(p.name for p in lacking[:8])}", lacking)
    if not config.metadata_path:
        other = ".caption" if config.caption_extension == ".txt" else ".txt"
        stray = sorted(p for p in config.train_data_dir.rglob(f"*{other}") if p.is_file())
        if stray:
            report.add(WARNING, "captions", f"{len(stray)} {other} files found but caption_extension is "
                       f"{config.caption_extension}: they are ignored (e.g. {stray[0].name})", stray)
        _captions_without_images(config, report)


def _captions_without_images(config: TrainConfig, report: CheckReport) -> None:
    """A caption file with no image beside it usually means an image in a format that is not read (or a
    deleted image): say so instead of training fewer images without a word."""
    stems = {(p.parent, p.stem) for p in list_images(config.train_data_dir)}
    lonely = sorted(p for p in config.train_data_dir.rglob("*") if p.suffix.lower() == config.caption_extension
                    and (p.parent, p.stem) not in stems and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(config.train_data_dir).parts))
    if lonely:
        report.add(WARNING, "captions", f"{len(lonely)} caption files have no image beside them, so nothing is "
                   f"trained from them: {', '.join(p.name for p in lonely[:5])}. Is the image missing, or in a "
                   "format that is not read (the other checks name those)?", lonely)


# --- settings ----------------------------------------------------------------------------------------------
def _settings_findings(samples: list[Sample], config: TrainConfig, report: CheckReport) -> None:
    items = sum(s.repeats for s in samples)
    per_epoch = max(1, math.ceil(math.ceil(items / config.batch_size) / config.gradient_accumulation_steps))
    total = config.max_train_steps or per_epoch * config.epochs
    report.stats.update(images=len(samples), images_with_repeats=items, steps_per_epoch=per_epoch, total_steps=total)
    n = len(samples)
    if n < 20:
        report.add(ADVICE, "settings", f"{n} images is few; 50-100 precise, well-captioned images usually work best")
    elif n > 150:
        report.add(ADVICE, "settings", f"{n} images: 50 precise images beat 150 vague ones; prune near-duplicates "
                   "and weak shots rather than adding more")
    if not 10 <= config.epochs <= 20 and not config.max_train_steps:
        report.add(ADVICE, "settings", f"epochs {config.epochs}: 10-20 is the usual range for 50-100 images")
    if not 1e-4 <= config.learning_rate <= 2e-4:
        report.add(ADVICE, "settings", f"learning_rate {config.learning_rate:g}: 2e-4 is a good start (1e-4 if "
                   "the loss jumps around)")
    tag_count = np.mean([len(tags(s.caption)) for s in samples]) if samples else 0
    complex_scenes = tag_count >= 5 or np.mean([len(content_words(s.caption)) for s in samples] or [0]) >= 12
    if complex_scenes and config.lora_rank < 16:
        report.add(ADVICE, "settings", f"lora_rank {config.lora_rank}: these captions describe complex scenes; "
                   "rank 16 holds multi-object scenes better")
    elif not complex_scenes and config.lora_rank > 16:
        report.add(ADVICE, "settings", f"lora_rank {config.lora_rank}: for a simple style rank 8 is usually "
                   "enough (a smaller file, less overfitting)")


def dataset_warnings(samples: list[Sample], config: TrainConfig) -> list[Finding]:
    """The image and caption warnings of `check`, for `train` to print before it starts (it already refuses
    errors through scan_dataset)."""
    report = CheckReport()
    _token_findings(samples, config, report)  # first: train prints only the first few, and this one loses words
    _image_findings(samples, config, report)
    _orphans(samples, config, report)
    _caption_findings(samples, config, None, report)
    return report.findings


def _base_findings(config: TrainConfig, report: CheckReport) -> None:
    """What training would refuse about the base at once (an SD2 file that does not say what it predicts), and
    a resolution below the one the model was trained at. A base that cannot be read is training's to report."""
    from ..errors import ModelLoadError
    from ..families.loading import ARCHITECTURE_KEY, base_family

    base = Path(config.base_model)
    if not base.exists():
        return
    try:
        family, metadata = base_family(base)
    except ModelLoadError:
        return
    stated = family.stated_prediction_type(base, metadata)
    kind = stated if config.prediction_type == "auto" else config.prediction_type
    if kind is None and family.resolution_for("v_prediction") != family.resolution_for("epsilon"):
        report.add(ERROR, "settings", f"base_model is a {family.label} file that does not say whether it predicts "
                   "epsilon (512-base) or v (768-v): set prediction_type: epsilon or prediction_type: v_prediction")
    elif config.resolution < family.resolution_for(kind) and ARCHITECTURE_KEY not in metadata:  # a real-size model
        report.add(WARNING, "settings", f"resolution {config.resolution}: this {family.label} model was trained at "
                   f"{family.resolution_for(kind)} px; LoRAs trained smaller draw worse at its native size")


def check_dataset(config: TrainConfig, trigger: str | None = None, vram_gb: float | None = None) -> CheckReport:
    report = CheckReport()
    notes: list[str] = []
    try:
        samples, problems = collect(config, notes)
    except DatasetError as exc:
        for p in exc.problems:
            report.add(ERROR, "captions", p)
        return report
    for p in problems:
        report.add(ERROR, "captions" if "caption" in p else "images", p, [p.split(": ")[0]])
    for note in notes:
        report.add(WARNING, "images", note, [note.split(": ")[0]])
    if not samples:
        report.add(ERROR, "images", f"no usable images in {config.train_data_dir}. {no_images_hint(config)}")
        return report
    _token_findings(samples, config, report)
    _image_findings(samples, config, report)
    _orphans(samples, config, report)
    _caption_findings(samples, config, trigger, report)
    _settings_findings(samples, config, report)
    _base_findings(config, report)
    if config.batch_size > report.stats["images_with_repeats"]:
        report.add(ERROR, "settings", f"batch_size {config.batch_size} is larger than the dataset "
                   f"({report.stats['images_with_repeats']} images counting repeats)")
    from ..training.memory import estimate_memory

    try:
        estimate = estimate_memory(config)
    except Exception as exc:  # the estimate is advice; a failure must not block the report
        report.add(WARNING, "memory", f"no memory estimate: {exc}")
    else:
        report.stats["memory"] = estimate.as_dict()
        if vram_gb is not None and estimate.total_gb > vram_gb:
            from ..training.memory import fit_advice

            report.add(WARNING, "memory", fit_advice(config, estimate, vram_gb))
    return report
