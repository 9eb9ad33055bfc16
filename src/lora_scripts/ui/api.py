"""The JSON API under /api. Each route is a thin call into the library; errors become JSON with a message the
page shows as it is (the CLI's wording)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from ..atomic import atomic_write_bytes, atomic_write_text
from ..config import TrainConfig, resolve_paths
from ..data.captions import read_captions, set_caption
from ..data.images import IMAGE_EXTENSIONS
from ..metrics import read_curves
from ..render import Settings
from .forms import form_fields, form_values, to_yaml, validate_raw, validate_values
from .workspace import OutsideWorkspace, Workspace

MAX_UPLOAD_BYTES = 25 * 2**20  # one image; larger files are refused before they are written
SERVED_SUFFIXES = set(IMAGE_EXTENSIONS) | {".yaml", ".yml", ".csv", ".txt", ".json"}

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


class ToolBody(BaseModel):
    lora: str  # workspace path of the LoRA file
    action: Literal["verify", "convert", "resize"]
    base_model: str | None = None  # verify (required) and convert (optional: names the layers)
    to: Literal["kohya", "diffusers"] = "diffusers"
    rank: int = Field(8, ge=1, le=1024)


class CompareBody(BaseModel):
    jobs: list[int] = Field(..., min_length=1)
    prompt: str
    seed: int = 1
    weight: float = 1.0
    steps: int = Field(20, ge=1, le=150)
    cfg: float = Field(5.0, ge=0, le=30)


class GenerateBody(BaseModel):
    base_model: str
    prompt: str
    negative: str = ""
    seed: int = 1
    steps: int = Field(25, ge=1, le=150)
    cfg: float = Field(5.0, ge=0, le=30)
    sampler: str = "euler_a"
    strengths: list[float] | None = None  # a strength sweep of the prompt's first <lora:...> tag


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
def save_config(request: Request, body: ConfigBody) -> dict:
    """Saved even with errors (a draft); the answer carries them, and a job refuses an invalid file."""
    ws = _ws(request)
    path = ws.path(body.path)
    if path.suffix not in (".yaml", ".yml"):
        raise HTTPException(400, f"{body.path}: give the config a .yaml name")
    config, errors = validate_values(body.values, path.parent, ws)
    atomic_write_text(path, to_yaml(body.values))
    return {"ok": config is not None, "saved": ws.rel(path), **errors}


def _config(ws: Workspace, rel: str) -> TrainConfig:
    config, errors = validate_raw(_read_yaml(ws, rel), ws.path(rel).parent, ws)
    if config is None:
        problems = [m for msgs in errors["fields"].values() for m in msgs] + errors["general"]
        raise HTTPException(400, f"{rel} has problems:\n" + "\n".join(problems))
    return config


def _data_location(ws: Workspace, rel: str) -> tuple[Path, Path | None, str]:
    """(train_data_dir, metadata_path, caption_extension) from a config, read leniently: the dataset page works
    while other keys of the config are still wrong."""
    raw = _read_yaml(ws, rel)
    if not raw.get("train_data_dir"):
        raise HTTPException(400, f"{rel}: set train_data_dir first")
    paths = resolve_paths(raw, ws.path(rel).parent)  # as load_config reads them: relative to the config file
    data_dir = Path(paths["train_data_dir"]).resolve()
    csv_path = Path(paths["metadata_path"]).resolve() if paths.get("metadata_path") else None
    for key, p in (("train_data_dir", data_dir), ("metadata_path", csv_path)):
        if p is not None and not ws.contains(p):
            raise OutsideWorkspace(f"{key} = {raw[key]!r}: outside the workspace ({ws.root})")
    if not data_dir.is_dir():
        raise HTTPException(400, f"train_data_dir = {raw['train_data_dir']!r}: folder does not exist")
    return data_dir, csv_path, str(raw.get("caption_extension") or ".txt")


# --- dataset -------------------------------------------------------------------------------------------------
@router.get("/dataset")
def dataset(request: Request, config: str) -> dict:
    ws = _ws(request)
    data_dir, csv_path, ext = _data_location(ws, config)
    items = read_captions(data_dir, csv_path, ext)
    return {"data_dir": ws.rel(data_dir), "captions_in": ws.rel(csv_path) if csv_path else f"sidecar {ext} files",
            "images": [{"path": ws.rel(i.path), "caption": i.caption} for i in items]}


@router.put("/caption")
def caption(request: Request, body: CaptionBody) -> dict:
    ws = _ws(request)
    data_dir, csv_path, ext = _data_location(ws, body.config)
    image = ws.path(body.image, must_exist=True)
    if not image.is_relative_to(data_dir):
        raise HTTPException(400, f"{body.image} is not in this config's train_data_dir")
    written = set_caption(image, body.caption, data_dir, csv_path, ext)
    return {"written": ws.rel(written), "caption": " ".join(body.caption.split())}


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
async def upload(request: Request, folder: str = Query(...), files: list[UploadFile] = File(...)) -> dict:
    ws = _ws(request)
    ws.path(folder)  # a folder outside the workspace is refused before any upload is read
    saved = []
    for up in files:
        name = Path(up.filename or "").name
        if not name or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
            raise HTTPException(400, f"{up.filename!r}: only images ({', '.join(sorted(IMAGE_EXTENSIONS))}) can be uploaded")
        data = await up.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"{name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise HTTPException(400, f"{name}: not a readable image ({exc})") from None
        dest = ws.path(Path(folder) / name)
        atomic_write_bytes(dest, data)
        saved.append(ws.rel(dest))
    return {"saved": saved}


@router.get("/file")
def file(request: Request, path: str) -> FileResponse:
    target = _ws(request).path(path, must_exist=True)
    if not target.is_file() or target.suffix.lower() not in SERVED_SUFFIXES:
        raise HTTPException(404, f"{path}: not a file the UI serves")
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
    config = _config(ws, body.config)  # refused here, with the CLI's messages, rather than failing in the queue
    return _job_view(request, request.app.state.queue.submit(ws.rel(ws.path(body.config)), ws.rel(config.output_dir)))


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
    _job(request, job_id)
    try:
        return _job_view(request, request.app.state.queue.resume(job_id))
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
    studio = request.app.state.studio
    return [{"name": name, **studio.describe(path)} for name, path in sorted(studio.loras().items())]


@router.get("/models")
def models(request: Request) -> list[str]:
    return request.app.state.studio.base_models()


@router.post("/generate")
def generate(request: Request, body: GenerateBody) -> dict:
    ws, studio = _ws(request), request.app.state.studio
    base = ws.path(body.base_model, must_exist=True)
    settings = Settings(steps=body.steps, cfg=body.cfg, scheduler=body.sampler, negative=body.negative)
    if body.strengths:
        return {"image": studio.sweep(base, body.prompt, body.seed, body.strengths, settings)}
    return {"image": studio.generate(base, body.prompt, body.seed, settings)}



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
        report = verify(src, base)
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

    from ..compare import image_grid, read_run, write_comparison
    from ..render import Renderer

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
    settings = Settings(steps=body.steps, cfg=body.cfg)
    with request.app.state.studio.lock:
        sheet = image_grid(Renderer(base, [], settings), runs, [body.prompt], [body.seed, body.seed + 1], body.weight)
    out = ws.state / "compare" / time.strftime("%Y%m%d-%H%M%S")
    paths = write_comparison(out, sheet, runs)
    return {"sheet": ws.rel(paths["sheet"]), "losses": ws.rel(paths["losses"]), "rows": [r.row() for r in runs],
            "bases": sorted(bases)}
