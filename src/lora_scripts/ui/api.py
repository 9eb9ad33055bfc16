"""The JSON API under /api. Each route is a thin call into the library; errors become JSON with a message the
page shows as it is (the CLI's wording)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from ..atomic import atomic_write_text
from ..config import CAPTION_EXTENSIONS, SEED_MAX, TrainConfig, resolve_paths
from ..data.captions import read_captions, set_caption
from ..data.images import IMAGE_EXTENSIONS
from ..training.metrics import read_curves
from ..generation.render import Settings
from . import uploads
from .forms import form_fields, form_values, snapshot_yaml, to_yaml, validate_raw, validate_values
from .workspace import OutsideWorkspace, Workspace

SERVED_SUFFIXES = set(IMAGE_EXTENSIONS) | {".yaml", ".yml", ".csv", ".txt", ".json"}
# Where the UI may write a caption: text files only, so a config's caption_extension can never make it write over
# an image or create a YAML file (kohya/OneTrainer sidecars are .txt or .caption).
CAPTION_SUFFIXES = CAPTION_EXTENSIONS  # the config's list, checked here again whatever a config file holds

router = APIRouter(prefix="/api")


def _ws(request: Request) -> Workspace:
    return request.app.state.workspace


class ConfigBody(BaseModel):
    path: str
    values: dict[str, Any] = Field(default_factory=dict)


class CaptionBody(BaseModel):
    config: str
    image: str
    caption: str


class LabelBody(BaseModel):
    config: str
    trigger: str = ""
    overwrite: bool = False
    backend: Literal["basic", "blip", "wd14"] = "basic"
    model: str | None = None  # blip/wd14: a model folder inside the workspace


class CheckBody(BaseModel):
    config: str
    trigger: str | None = None
    vram_gb: float | None = Field(None, gt=0)


class JobBody(BaseModel):
    config: str


class BaseFiles(BaseModel):
    """A base kept as several files (Flux.1): its other files and the T5 tokenizer folder, as workspace paths.
    Those not given are looked for beside the base (or in its ComfyUI models/ tree) inside the workspace."""
    clip_l: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    tokenizer_dir: str | None = None


def _base_files(ws: Workspace, base: Path, given: BaseFiles,
                fallback: dict[str, Any] | None = None) -> tuple[dict[str, Path], Path | None]:
    """given's files, else fallback's (a run's config: absolute paths, which must lie in the workspace), else
    those found beside the base in the workspace."""
    from ..base_args import with_companions
    from ..config import FLUX_FILE_KEYS

    def pick(key: str) -> Path | None:
        if getattr(given, key):
            return ws.path(getattr(given, key), must_exist=True)
        value = (fallback or {}).get(key)
        if not value:
            return None
        if not ws.contains(Path(value)):
            raise OutsideWorkspace(f"{key} {value}: outside the workspace")
        return Path(value)

    files = {k: path for k in FLUX_FILE_KEYS if (path := pick(k)) is not None}
    return with_companions(base, files, ws.contains), pick("tokenizer_dir")


def _size(text: str | None) -> tuple[int, int] | None:
    from ..generation.commands import parse_size

    return parse_size(text, "size") if text and text.strip() else None


class ToolBody(BaseFiles):
    lora: str  # workspace path of the LoRA file
    action: Literal["verify", "convert", "resize"]
    base_model: str | None = None  # verify (required) and convert (optional: names the layers)
    to: Literal["kohya", "diffusers"] = "diffusers"
    rank: int = Field(8, ge=1, le=1024)


class CompareBody(BaseModel):
    jobs: list[int] = Field(..., min_length=1)
    prompt: str
    seed: int = Field(1, ge=0, le=SEED_MAX - 1)  # the sheet uses seed and seed + 1
    weight: float = 1.0
    steps: int | None = Field(None, ge=1, le=150)  # None: the model's own (as GenerateBody)
    cfg: float | None = Field(None, ge=0, le=30)
    size: str | None = None  # "WIDTHxHEIGHT"; None: the model's native size


class ControlBody(BaseModel):
    """One ControlNet unit, as `generate --control TYPE:MODEL --control-image IMG ...`; paths in the workspace."""
    type: Literal["canny", "softedge", "lineart", "none", "depth", "pose"] = "canny"  # depth, pose: as none
    model: str
    image: str
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | None = None  # a union ControlNet's control type


class GenerateBody(BaseFiles):
    base_model: str
    prompt: str
    negative: str = ""
    seed: int = Field(1, ge=0, le=SEED_MAX)
    # None: what the model is drawn with (Flux.1-dev 28 steps / guidance 3.5, schnell 4 / 0, SD 30 / 7).
    steps: int | None = Field(None, ge=1, le=150)
    cfg: float | None = Field(None, ge=0, le=30)
    size: str | None = None  # "WIDTHxHEIGHT"; None: the model's native size
    sampler: str = "euler_a"
    strengths: list[float] | None = None  # a strength sweep of the prompt's first <lora:...> tag
    # What the base predicts where its file does not say (SD2 single files), as prediction_type in a config.
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    control: list[ControlBody] = Field(default_factory=list, max_length=4)  # layout from maps (ControlNet)
    ip_adapter: str | None = None  # the look of a reference image (IP-Adapter file)
    ip_image: str | None = None
    ip_scale: float = 1.0
    ip_encoder: str | None = None  # its image encoder folder; None: image_encoder beside the file


# --- config editor -------------------------------------------------------------------------------------------
@router.get("/info")
def info(request: Request) -> dict:
    ws = _ws(request)
    return {"workspace": str(ws.root), "configs": ws.configs(), "default_config": request.app.state.default_config}


@router.get("/schema")
def schema() -> list[dict]:
    return form_fields()


def _read_yaml(ws: Workspace, rel: str) -> dict:
    path = ws.path(rel, must_exist=True)
    if path.suffix not in (".yaml", ".yml"):
        raise HTTPException(400, f"{rel}: configs are .yaml files")
    if not path.is_file():
        raise HTTPException(400, f"{rel}: is a folder, not a config file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"{rel}: not a readable YAML file ({exc})") from None
    if not isinstance(loaded, dict):
        raise HTTPException(400, f"{rel}: expected 'key: value' lines")
    return loaded


@router.get("/config")
def get_config(request: Request, path: str) -> dict:
    return {"path": path, "values": form_values(_read_yaml(_ws(request), path))}


@router.post("/config/validate")
def validate(request: Request, body: ConfigBody) -> dict:
    ws = _ws(request)
    config, errors = validate_values(body.values, ws.path(body.path).parent, ws)
    return {"ok": config is not None, **errors}


@router.put("/config")
def save_config(request: Request, body: ConfigBody):
    """Saved even with errors (a draft); the answer carries them, and a job refuses an invalid file. A config
    whose paths leave the workspace is not saved at all (403): the UI never writes such a file."""
    ws = _ws(request)
    path = ws.path(body.path, write=True)
    if path.suffix not in (".yaml", ".yml"):
        raise HTTPException(400, f"{body.path}: give the config a .yaml name")
    if path.is_dir():
        raise HTTPException(400, f"{body.path}: is a folder; give the config a file name")
    config, errors = validate_values(body.values, path.parent, ws)
    if errors["outside"]:
        message = f"{body.path}: not saved, its paths must stay in the workspace:\n" + "\n".join(errors["outside"])
        return JSONResponse({"error": message, "ok": False, "saved": None, **errors}, status_code=403)
    atomic_write_text(path, to_yaml(body.values))
    return {"ok": config is not None, "saved": ws.rel(path), **errors}


def _validated(ws: Workspace, rel: str) -> tuple[TrainConfig, str]:
    """(config, snapshot): the config file validated as a job would run it, and the YAML text of exactly what was
    validated (what a job runs; reading the file twice could pick up an edit made in between)."""
    raw = _read_yaml(ws, rel)
    config, errors = validate_raw(raw, ws.path(rel).parent, ws)
    if config is None:
        problems = [m for msgs in errors["fields"].values() for m in msgs] + errors["general"]
        raise HTTPException(400, f"{rel} has problems:\n" + "\n".join(problems))
    return config, snapshot_yaml(raw, ws.path(rel).parent, rel)


def _config(ws: Workspace, rel: str) -> TrainConfig:
    return _validated(ws, rel)[0]


def _data_location(ws: Workspace, rel: str) -> tuple[Path, Path | None, str]:
    """(train_data_dir, metadata_path, caption_extension) from a config, read leniently: the dataset page works
    while other keys of the config are still wrong."""
    raw = _read_yaml(ws, rel)
    for key in ("train_data_dir", "metadata_path", "caption_extension"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise HTTPException(400, f"{rel}: {key} = {raw[key]!r}: expected text (a path, or for "
                                     "caption_extension an extension such as .txt)")
    if not raw.get("train_data_dir"):
        raise HTTPException(400, f"{rel}: set train_data_dir first")
    paths = resolve_paths(raw, ws.path(rel).parent)  # as load_config reads them: relative to the config file
    data_dir = Path(paths["train_data_dir"])
    csv_path = Path(paths["metadata_path"]) if paths.get("metadata_path") else None
    for key, p in (("train_data_dir", data_dir), ("metadata_path", csv_path)):
        if p is not None and (not ws.contains(p) or ws.in_state(p)):
            raise OutsideWorkspace(f"{key} = {raw[key]!r}: outside the workspace ({ws.root}), or in its "
                                   f"{ws.state.name} folder; the web UI only reads and writes inside it")
    data_dir, csv_path = data_dir.resolve(), csv_path.resolve() if csv_path else None
    if not data_dir.is_dir():
        raise HTTPException(400, f"train_data_dir = {raw['train_data_dir']!r}: folder does not exist")
    if csv_path is not None and csv_path.suffix.lower() != ".csv":
        raise HTTPException(400, f"metadata_path = {raw['metadata_path']!r}: captions are edited in a .csv file "
                                 "(file_name,text); point it at metadata.csv, or remove it to use .txt captions")
    return data_dir, csv_path, _caption_extension(raw.get("caption_extension"))


def _caption_extension(value: str | None) -> str:
    """caption_extension as the UI will use it, checked against CAPTION_SUFFIXES whatever the config module says:
    the UI writes IMAGE_STEM + this extension, so an image or YAML extension here would destroy files."""
    ext = (value or ".txt").strip()
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() not in CAPTION_SUFFIXES:
        raise HTTPException(400, f"caption_extension = {value!r}: captions are text files; use one of "
                                 f"{', '.join(CAPTION_SUFFIXES)} (an image or config extension would make the UI "
                                 "write captions over those files)")
    return ext


# --- dataset -------------------------------------------------------------------------------------------------
@router.get("/dataset")
def dataset(request: Request, config: str) -> dict:
    """The images with their captions. An image (or its caption file) that is a link leading out of the workspace
    is left out and listed under "refused": the page never shows or edits what lies outside."""
    ws = _ws(request)
    data_dir, csv_path, ext = _data_location(ws, config)
    images, refused = [], []
    for item in read_captions(data_dir, csv_path, ext):
        shown = item.path.relative_to(ws.root).as_posix() if item.path.is_relative_to(ws.root) else str(item.path)
        side = None if csv_path else data_dir / item.key
        if not ws.contains(item.path):
            refused.append({"path": shown, "reason": "a link to a file outside the workspace; not shown"})
        elif side is not None and not ws.contains(side):
            refused.append({"path": shown, "reason": f"its caption file {item.key} links outside the workspace"})
        else:
            images.append({"path": ws.rel(item.path), "caption": item.caption})
    return {"data_dir": ws.rel(data_dir), "captions_in": ws.rel(csv_path) if csv_path else f"sidecar {ext} files",
            "images": images, "refused": refused}


@router.put("/caption")
def caption(request: Request, body: CaptionBody) -> dict:
    ws = _ws(request)
    data_dir, csv_path, ext = _data_location(ws, body.config)
    image = ws.path(body.image, must_exist=True)
    if not image.is_file() or image.suffix.lower() not in IMAGE_EXTENSIONS:
        raise HTTPException(400, f"{body.image}: not an image file; captions belong to images")
    if not image.is_relative_to(data_dir):
        raise HTTPException(400, f"{body.image} is not in this config's train_data_dir")
    _caption_target_ok(ws, body.image, image.with_suffix(ext) if csv_path is None else csv_path, image)
    written = set_caption(image, body.caption, data_dir, csv_path, ext)
    return {"written": ws.rel(written), "caption": " ".join(body.caption.split())}


def _caption_target_ok(ws: Workspace, shown: str, target: Path, image: Path) -> None:
    """The file a caption edit rewrites: a text file in the workspace (not the image, not a folder, not a link
    that leads out, not the UI's own folder)."""
    if target.suffix.lower() not in CAPTION_SUFFIXES + (".csv",) or target.resolve() == image.resolve():
        raise HTTPException(400, f"{shown}: its caption would be written to {target.name}, which is not a text file")
    if not ws.contains(target) or ws.in_state(target):
        raise OutsideWorkspace(f"{shown}: its caption file {target.name} leads outside the workspace ({ws.root})")
    if target.is_dir():
        raise HTTPException(400, f"{shown}: {target.name} is a folder, not a caption file; rename or remove it")


@router.post("/label")
def label(request: Request, body: LabelBody) -> dict:
    from ..labeling.label import label_folder

    ws = _ws(request)
    data_dir, csv_path, _ = _data_location(ws, body.config)
    model = str(ws.path(body.model, must_exist=True)) if body.model else None
    result = label_folder(data_dir, csv_path, body.backend, model, body.trigger, overwrite=body.overwrite)
    return {"csv": ws.rel(result.csv_path), "written": result.written, "kept": result.kept, "failed": result.failed}


@router.post("/check")
def check(request: Request, body: CheckBody) -> dict:
    import json

    from ..data.check import check_dataset

    report = check_dataset(_config(_ws(request), body.config), trigger=body.trigger or None, vram_gb=body.vram_gb)
    return {"ok": report.ok, "text": report.text(), "report": json.loads(report.to_json())}


@router.post("/upload")
async def upload(request: Request, folder: str = Query(...)) -> dict:
    """Images into a workspace folder. Read as they stream in: a request or a file over its limit is refused as
    soon as that is known (Content-Length first), before the rest is read. Every file is checked to be a readable
    image of a sane size before any is placed. An existing file is never replaced: the same picture again is
    skipped, a different one under the same name is saved as NAME_2.png (and the answer says so)."""
    ws = _ws(request)
    dest = ws.path(folder, write=True)  # a folder outside the workspace is refused before any upload is read
    if dest.exists() and not dest.is_dir():
        raise HTTPException(400, f"{folder}: is a file, not a folder; upload into a folder")
    received = await uploads.receive(request, ws.state / "uploads")
    try:
        for item in received:
            await run_in_threadpool(uploads.check_image, item)
        dest.mkdir(parents=True, exist_ok=True)
        placed = [uploads.place(item, dest) for item in received]
    finally:
        uploads.discard(received)
    saved = [ws.rel(p) for p, how in placed if how != "duplicate"]
    renamed = [{"from": item.name, "to": ws.rel(p)} for item, (p, how) in zip(received, placed) if how == "renamed"]
    skipped = [item.name for item, (_, how) in zip(received, placed) if how == "duplicate"]
    notes = [f"{r['from']}: a different image of that name is already there; saved as {Path(r['to']).name}"
             for r in renamed] + [f"{name}: already there (same picture); not added again" for name in skipped]
    return {"saved": saved, "renamed": renamed, "skipped": skipped, "notes": notes}


@router.get("/file")
def file(request: Request, path: str) -> FileResponse:
    target = _ws(request).path(path, must_exist=True)
    if not target.is_file() or target.suffix.lower() not in SERVED_SUFFIXES:
        raise HTTPException(404, f"{path}: not a file the UI serves")
    if target.suffix.lower() in IMAGE_EXTENSIONS:
        problem = uploads.too_large_to_show(target)
        if problem:  # the browser would try to decode gigabytes for a thumbnail
            raise HTTPException(422, f"{path}: {problem}")
    return FileResponse(target)


# --- jobs ----------------------------------------------------------------------------------------------------
def _job_view(request: Request, job) -> dict:
    queue = request.app.state.queue
    d = job.to_dict()
    d["progress"] = queue.progress(job.id)
    return d


@router.get("/jobs")
def jobs(request: Request) -> list[dict]:
    return [_job_view(request, j) for j in request.app.state.queue.store.all()]


@router.post("/jobs")
def start_job(request: Request, body: JobBody) -> dict:
    ws = _ws(request)
    # Refused here, with the CLI's messages, rather than failing in the queue; the job runs this validated copy.
    config, snapshot = _validated(ws, body.config)
    job = request.app.state.queue.submit(ws.rel(ws.path(body.config)), ws.rel(config.output_dir), snapshot)
    return _job_view(request, job)


def _job(request: Request, job_id: int):
    job = request.app.state.queue.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.get("/jobs/{job_id}")
def job_detail(request: Request, job_id: int) -> dict:
    job = _job(request, job_id)
    return {**_job_view(request, job), "log": request.app.state.queue.log(job_id)}


@router.post("/jobs/{job_id}/stop")
def stop_job(request: Request, job_id: int) -> dict:
    _job(request, job_id)
    return _job_view(request, request.app.state.queue.stop(job_id))


@router.post("/jobs/{job_id}/resume")
def resume_job(request: Request, job_id: int) -> dict:
    """Resume runs the config as it is now (a creator stops, raises max_train_steps, resumes), validated again
    like a new job; if the file is gone, the copy the job last ran."""
    ws = _ws(request)
    job = _job(request, job_id)
    if job.status not in ("stopped", "interrupted", "failed"):
        raise HTTPException(409, f"job {job_id} is {job.status}; only a stopped, interrupted or failed job can resume")
    snapshot = None
    if ws.path(job.config).is_file():
        snapshot = _validated(ws, job.config)[1]
    try:
        return _job_view(request, request.app.state.queue.resume(job_id, snapshot))
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None


@router.get("/jobs/{job_id}/curves")
def curves(request: Request, job_id: int) -> dict:
    """Loss per step (and validation loss) for the live chart, plus the sample images written so far."""
    ws = _ws(request)
    job = _job(request, job_id)
    if not job.output_dir:
        return {"steps": [], "loss": [], "validation": [], "samples": []}
    out = ws.path(job.output_dir)
    steps, losses, validation = read_curves(out)
    samples = sorted((out / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime) if (out / "samples").is_dir() else []
    return {"steps": steps, "loss": losses, "validation": [list(v) for v in validation],
            "samples": [ws.rel(p) for p in samples[-12:]]}


# --- LoRA library --------------------------------------------------------------------------------------------
@router.get("/loras")
def loras(request: Request) -> list[dict]:
    """Every LoRA file in the workspace, described; one that is a link leading out of the workspace is listed
    with "refused" (and its reason) instead, and is never loaded."""
    studio = request.app.state.studio
    found = [{"name": name, **studio.describe(path)} for name, path in sorted(studio.loras().items())]
    return found + studio.refused_loras()


@router.get("/models")
def models(request: Request) -> list[str]:
    return request.app.state.studio.base_models()


@router.post("/generate")
def generate(request: Request, body: GenerateBody) -> dict:
    ws, studio = _ws(request), request.app.state.studio
    base = ws.path(body.base_model, must_exist=True)
    settings = Settings(steps=body.steps, cfg=body.cfg, scheduler=body.sampler, negative=body.negative,
                        size=_size(body.size))
    files, tokenizer_dir = _base_files(ws, base, body)
    guides = _guides(ws, body)
    if body.strengths:
        return {"image": studio.sweep(base, body.prompt, body.seed, body.strengths, settings, body.prediction_type,
                                      files, tokenizer_dir, guides)}
    return {"image": studio.generate(base, body.prompt, body.seed, settings, body.prediction_type, files,
                                     tokenizer_dir, guides)}


def _guides(ws: Workspace, body: GenerateBody):
    """The ControlNet units and the IP-Adapter of a request: every file a workspace path that exists."""
    from ..generation.control import ControlUnit
    from ..generation.control_maps import AS_IS_ALIASES
    from ..generation.ip_adapter import IpAdapterUnit

    units: list[ControlUnit] = []
    for c in body.control:
        kind = "none" if c.type in AS_IS_ALIASES else c.type
        units.append(ControlUnit(kind, ws.path(c.model, must_exist=True), ws.path(c.image, must_exist=True),
                                 c.weight, c.start, c.end, mode=c.mode))
    for unit in units:
        unit.read_image()
    ip = None
    if body.ip_adapter or body.ip_image:
        if not (body.ip_adapter and body.ip_image):
            raise HTTPException(400, "an IP-Adapter needs both its file (ip_adapter) and a reference image (ip_image)")
        encoder = ws.path(body.ip_encoder, must_exist=True) if body.ip_encoder else None
        ip = IpAdapterUnit(ws.path(body.ip_adapter, must_exist=True), ws.path(body.ip_image, must_exist=True),
                           body.ip_scale, encoder)
        if not ws.contains(ip.encoder_folder):
            raise OutsideWorkspace(f"image encoder {ip.encoder_folder}: outside the workspace")
        ip.read_image()
    return units, ip



@router.post("/loras/tool")
def lora_tool(request: Request, body: ToolBody) -> dict:
    """inspect's siblings on one file: verify it loads as A1111/ComfyUI/diffusers would, convert it, resize it.
    New files go beside the original and never replace an existing one."""
    from ..interop.files import convert_file, refuse_overwrite, resize_file
    from ..interop.verify import verify

    ws = _ws(request)
    src = ws.path(body.lora, must_exist=True)
    base = ws.path(body.base_model, must_exist=True) if body.base_model else None
    if body.action == "verify":
        if base is None:
            raise HTTPException(400, "verify needs base_model: the checkpoint the LoRA is meant for")
        report = verify(src, base, files=_base_files(ws, base, body)[0])
        return {"ok": report.ok, "text": report.summary(), "problems": report.problems()}
    if body.action == "convert":
        out = src.with_name(f"{src.stem}_{body.to}.safetensors")
        refuse_overwrite(out, force=False)
        return {"ok": True, "text": convert_file(src, out, body.to, base), "written": ws.rel(out)}
    out = src.with_name(f"{src.stem}_r{body.rank}.safetensors")
    refuse_overwrite(out, force=False)
    r = resize_file(src, out, body.rank)
    return {"ok": True, "written": ws.rel(out),
            "text": f"rank {r.rank_before} -> {r.rank}: kept energy mean {r.mean_energy:.4f}, lowest "
                    f"{r.worst.energy:.4f} in {r.worst.name}"}


@router.post("/compare")
def compare(request: Request, body: CompareBody) -> dict:
    """`lora-scripts compare` on finished jobs: base + each run's LoRA on the same prompt and seeds, loss overlay,
    settings table."""
    import time

    from ..generation.compare import image_grid, read_run, write_comparison
    from ..generation.render import Renderer

    ws = _ws(request)
    runs = []
    for job_id in body.jobs:
        job = _job(request, job_id)
        if not job.output_dir:
            raise HTTPException(400, f"job {job_id} has no output folder yet")
        runs.append(read_run(ws.path(job.output_dir)))
    bases = {str(r.config.get("base_model")) for r in runs}
    base = Path(sorted(bases)[0])
    if not ws.contains(base):
        raise OutsideWorkspace(f"base_model {base}: outside the workspace")
    settings = Settings(steps=body.steps, cfg=body.cfg, size=_size(body.size))
    # The runs' own separate files (a Flux base), as `lora-scripts compare` takes them.
    files, tokenizer_dir = _base_files(ws, base, BaseFiles(), next((r.config for r in runs if r.config.get("clip_l")), {}))
    with request.app.state.studio.lock:
        kind = next((r.config.get("prediction_type") for r in runs), None) or "auto"
        renderer = Renderer(base, [], settings, kind, any(r.config.get("zero_terminal_snr") for r in runs), files,
                            tokenizer_dir)
        sheet = image_grid(renderer, runs, [body.prompt], [body.seed, body.seed + 1], body.weight)
    out = ws.state / "compare" / time.strftime("%Y%m%d-%H%M%S")
    paths = write_comparison(out, sheet, runs)
    return {"sheet": ws.rel(paths["sheet"]), "losses": ws.rel(paths["losses"]), "rows": [r.row() for r in runs],
            "bases": sorted(bases)}
