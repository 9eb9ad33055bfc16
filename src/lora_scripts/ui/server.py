"""`lora-scripts ui`: FastAPI serving the JSON API and a static page (plain HTML/JS/CSS shipped in the package:
no front-end build, nothing fetched at run time).

Why FastAPI and not Gradio: the config form is generated from the same pydantic model the CLI validates with,
jobs need a queue in separate processes with state on disk (not Gradio's in-process queue), and every request
path must pass one workspace check - all easier to see and test with plain routes (Starlette's TestClient).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..errors import LoraScriptsError
from .api import router
from .jobs import JobQueue
from .security import Guard, is_loopback, new_token
from .studio import Studio
from .workspace import OutsideWorkspace, Workspace

STATIC = Path(str(resources.files("lora_scripts.ui").joinpath("static")))


def create_app(workspace: Path, host: str = "127.0.0.1", token: str | None = None, run_queue: bool = True,
               seed_demo: bool = True) -> FastAPI:
    """token: required on every request when given; `serve` makes one for any non-loopback host."""
    ws = Workspace(workspace)
    default_config = ws.seed_with_demo() if seed_demo else None
    queue = JobQueue(ws)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if run_queue:
            queue.start()
        yield
        queue.shutdown()

    app = FastAPI(title="lora-scripts", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workspace = ws
    app.state.queue = queue
    app.state.studio = Studio(ws)
    app.state.default_config = default_config or next(iter(ws.configs()), None)
    allowed = {"127.0.0.1", "localhost", "::1", host.lower()} if is_loopback(host) else set()
    app.add_middleware(Guard, token=token, allowed_hosts=allowed)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.exception_handler(OutsideWorkspace)
    async def _outside(request: Request, exc: OutsideWorkspace):
        return JSONResponse({"error": str(exc)}, status_code=403)

    @app.exception_handler(FileNotFoundError)
    async def _missing(request: Request, exc: FileNotFoundError):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(LoraScriptsError)
    async def _user_error(request: Request, exc: LoraScriptsError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError):
        # A folder where a file was expected, no permission, a full disk: the file and the reason, not a 500.
        where = f"{exc.filename}: " if exc.filename else ""
        return JSONResponse({"error": f"{where}{exc.strerror or exc}"}, status_code=400)

    @app.exception_handler(HTTPException)  # starlette's: FastAPI's own (a body that is not JSON) included
    async def _http(request: Request, exc: HTTPException):
        detail = exc.detail
        if detail == "There was an error parsing the body":
            detail = "the request body is not valid JSON text (UTF-8); send a JSON object"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": validation_message(exc.errors())}, status_code=422)

    return app


def validation_message(errors) -> str:
    """FastAPI's list of validation errors as one line per input: 'job_id (in the address) = 'abc': Input
    should be a valid integer'."""
    places = {"path": "in the address", "query": "in the query string", "header": "a header"}
    lines = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        where, name = (loc[0], ".".join(loc[1:])) if loc else ("body", "")
        if where == "body":
            label = name or "the request body"
        else:
            label = f"{name} ({places.get(where, where)})"
        if err.get("type") == "missing":
            lines.append(f"{label}: required, but missing")
            continue
        value = repr(err.get("input"))
        value = value if len(value) <= 80 else value[:77] + "..."
        lines.append(f"{label} = {value}: {err.get('msg', 'invalid')}")
    return "\n".join(lines) or "invalid request"


def serve(workspace: Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    token = None if is_loopback(host) else new_token()
    app = create_app(workspace, host, token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"lora-scripts ui: workspace {app.state.workspace.root}")
    print(f"open {url}" + ("" if token is None else "\n(the token is needed because the server listens beyond "
                                                    "this machine; share the address only with people you trust)"))
    uvicorn.run(app, host=host, port=port, log_level="warning")
