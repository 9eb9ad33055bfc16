"""Bad-input cases for the web UI's API (rows of docs/bad_inputs.md): each a request and the answer it gets."""

from __future__ import annotations

from pathlib import Path

from helpers.bad_inputs import Http

HTTP: list[Http] = []


def send(case: Http, root: Path) -> tuple[int, str]:
    """Seed a workspace under root, send the case's request; returns (status, detail)."""
    from fastapi.testclient import TestClient

    from lora_scripts.ui.server import create_app

    ws = root / "ws"
    create_app(ws, run_queue=False)
    with TestClient(create_app(ws, run_queue=False), base_url="http://127.0.0.1:7860") as client:
        response = case.send(client, ws)
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return response.status_code, detail if isinstance(detail, str) else str(detail)
