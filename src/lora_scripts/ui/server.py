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

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

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

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    return app


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
