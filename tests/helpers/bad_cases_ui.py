"""Bad-input cases for the web UI's API (rows of docs/bad_inputs.md): each a request and the answer it gets."""

from __future__ import annotations

from pathlib import Path

import yaml

from helpers.bad_inputs import Http, _huge_png, _png_bytes

H = {"X-Requested-With": "bad-inputs"}


def _config(ws: Path, name: str, drop=(), **changes) -> str:
    """A copy of the demo config with some keys changed (or dropped), as a workspace-relative path."""
    raw = yaml.safe_load((ws / "demo_neon_lab.yaml").read_text())
    raw.update({"output_dir": f"./output/{name}", **changes})
    for key in drop:
        raw.pop(key, None)
    (ws / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return f"{name}.yaml"


def _values(client, path="demo_neon_lab.yaml") -> dict:
    return client.get("/api/config", params={"path": path}).json()["values"]


def _upload(client, name: str, data: bytes, folder: str = "data/neon_lab"):
    return client.post("/api/upload", params={"folder": folder}, headers=H, files=[("files", (name, data, "image/png"))])


def _caption(client, config: str, image: str = "data/neon_lab/neon_003.png"):
    return client.put("/api/caption", headers=H, json={"config": config, "image": image, "caption": "a caption"})


def _sidecar(ws: Path, ext: str) -> str:
    return _config(ws, "sidecar", drop=("metadata_path",), caption_extension=ext)


def _job_escape(c, ws):
    return c.post("/api/jobs", headers=H, json={"config": _config(ws, "escape", output_name="../../../escape/pwned")})


def _job_outside_logs(c, ws):
    return c.post("/api/jobs", headers=H, json={"config": _config(ws, "logs", logging_dir="../../logs")})


def _put_outside(c, ws):
    return c.put("/api/config", headers=H,
                 json={"path": "demo_neon_lab.yaml", "values": {**_values(c), "base_model": "/etc/v1-5.safetensors"}})


def _put_state(c, ws):
    return c.put("/api/config", headers=H, json={"path": ".lora-scripts-ui/jobs/1/config.yaml", "values": _values(c)})


def _put_folder(c, ws):
    (ws / "folder.yaml").mkdir()
    return c.put("/api/config", headers=H, json={"path": "folder.yaml", "values": _values(c)})


def _huge_job_id(c, ws):
    return c.get("/api/jobs/99999999999999999999999")


def _ws_symlink_file(c, ws):
    (ws / "data/neon_lab/evil.png").symlink_to(ws.parent / "secret.png")
    (ws.parent / "secret.png").write_bytes(_png_bytes())
    return c.get("/api/file", params={"path": "data/neon_lab/evil.png"})


def _file_bomb(c, ws):
    (ws / "data/neon_lab/huge.png").write_bytes(_huge_png())
    return c.get("/api/file", params={"path": "data/neon_lab/huge.png"})


def _raw_json(method: str, url: str, content: bytes):
    return lambda c, ws: c.request(method, url, content=content, headers={**H, "Content-Type": "application/json"})


HTTP: list[Http] = [
    # configs and jobs: every path a job reads or writes stays in the workspace
    Http("ui_job_output_name_escape", "web UI: job whose output_name climbs out (../../../escape/pwned)", _job_escape,
         400, r"output_name = '\.\./\.\./\.\./escape/pwned': must be a plain file name"),
    Http("ui_job_logging_dir_outside", "web UI: job whose logging_dir is outside the workspace", _job_outside_logs,
         400, r"logging_dir = '\.\./\.\./logs': outside the workspace"),
    Http("ui_save_config_outside", "web UI: saving a config whose base_model is outside the workspace", _put_outside,
         403, r"not saved, its paths must stay in the workspace:\nbase_model = '/etc/v1-5\.safetensors': outside"),
    Http("ui_save_config_state_dir", "web UI: saving a config into .lora-scripts-ui (a job's validated copy)",
         _put_state, 403, r"\.lora-scripts-ui is the UI's own folder"),
    Http("ui_save_config_folder", "web UI: saving a config over a folder named like a .yaml", _put_folder,
         400, r"folder\.yaml: is a folder"),
    Http("ui_config_outside_workspace", "web UI: opening ../secret.yaml",
         lambda c, ws: c.get("/api/config", params={"path": "../secret.yaml"}), 403, r"resolves outside the workspace"),
    # captions
    Http("ui_caption_ext_image", "web UI: caption edit with caption_extension .png",
         lambda c, ws: _caption(c, _sidecar(ws, ".png")), 400, r"caption_extension = '\.png': captions are text files"),
    Http("ui_caption_ext_yaml", "web UI: caption edit with caption_extension .yaml",
         lambda c, ws: _caption(c, _sidecar(ws, "yaml")), 400, r"caption_extension = 'yaml': captions are text files"),
    Http("ui_caption_metadata_not_csv", "web UI: caption edit with metadata_path pointing at an image",
         lambda c, ws: _caption(c, _config(ws, "meta", metadata_path="./data/neon_lab/neon_001.png")),
         400, r"metadata_path = '\./data/neon_lab/neon_001\.png': captions are edited in a \.csv file"),
    Http("ui_caption_on_folder", "web UI: caption edit naming a folder instead of an image",
         lambda c, ws: _caption(c, "demo_neon_lab.yaml", "data/neon_lab"), 400, r"data/neon_lab: not an image file"),
    # uploads
    Http("ui_upload_bomb", "web UI: upload of a 20000x20000 PNG (decompression bomb)",
         lambda c, ws: _upload(c, "bomb.png", _huge_png()), 400, r"bomb\.png: image too large \(400 Mpx, over 64 Mpx\)"),
    Http("ui_upload_too_large", "web UI: upload of a 26 MB file",
         lambda c, ws: _upload(c, "big.png", b"\0" * (26 * 2**20)), 413, r"big\.png: larger than 25 MB"),
    Http("ui_upload_not_image", "web UI: upload of a shell script named .png",
         lambda c, ws: _upload(c, "fake.png", b"#!/bin/sh\nrm -rf /\n"), 400, r"fake\.png: not a readable image"),
    Http("ui_upload_wrong_type", "web UI: upload of a .sh file",
         lambda c, ws: _upload(c, "run.sh", b"echo"), 400, r"'run\.sh': only images"),
    Http("ui_upload_into_file", "web UI: upload into a file instead of a folder",
         lambda c, ws: _upload(c, "x.png", _png_bytes(), "data/neon_lab/neon_000.png"), 400, r"is a file, not a folder"),
    Http("ui_upload_not_multipart", "web UI: upload whose body is not multipart/form-data",
         lambda c, ws: c.post("/api/upload", params={"folder": "data"}, headers=H, content=b"junk"),
         400, r"send the images as multipart/form-data"),
    # files, ids, request bodies
    Http("ui_file_bomb", "web UI: showing a 20000x20000 PNG", _file_bomb, 422, r"huge\.png: image too large"),
    Http("ui_file_link_outside", "web UI: showing an image that links outside the workspace", _ws_symlink_file,
         403, r"evil\.png: resolves outside the workspace"),
    Http("ui_job_huge_id", "web UI: job id 99999999999999999999999", _huge_job_id, 404, r"no job 99999999999999999999999"),
    Http("ui_job_id_not_a_number", "web UI: job id 'abc'", lambda c, ws: c.get("/api/jobs/abc"),
         422, r"job_id \(in the address\) = 'abc': Input should be a valid integer"),
    Http("ui_json_wrong_type", "web UI: JSON field of the wrong type (config: 5)",
         lambda c, ws: c.post("/api/jobs", headers=H, json={"config": 5}), 422, r"config = 5: Input should be a valid string"),
    Http("ui_json_missing_field", "web UI: JSON body without a required field",
         lambda c, ws: c.put("/api/caption", headers=H, json={"config": "demo_neon_lab.yaml"}),
         422, r"image: required, but missing"),
    Http("ui_body_not_utf8", "web UI: request body that is not UTF-8 JSON", _raw_json("POST", "/api/jobs", b"\xff\xfe{"),
         400, r"the request body is not valid JSON text"),
    Http("ui_body_empty", "web UI: empty request body", _raw_json("PUT", "/api/config", b""),
         422, r"the request body: required, but missing"),
    Http("ui_generate_huge_seed", "web UI: generate with seed 10^30",
         lambda c, ws: c.post("/api/generate", headers=H, json={"base_model": "models/toy-sd15.safetensors",
                                                                 "prompt": "x", "seed": 10**30}),
         422, r"seed = 1000000000000000000000000000000: Input should be less than or equal to 4294967295"),
]


def send(case: Http, root: Path) -> tuple[int, str]:
    """Seed a workspace under root, send the case's request; returns (status, message). The UI answers errors as
    {"error": message} (what its page shows); FastAPI's own {"detail": ...} is read too."""
    from fastapi.testclient import TestClient

    from lora_scripts.ui.server import create_app

    ws = root / "ws"
    create_app(ws, run_queue=False)
    with TestClient(create_app(ws, run_queue=False), base_url="http://127.0.0.1:7860",
                    raise_server_exceptions=False) as client:
        response = case.send(client, ws)
    try:
        body = response.json()
        detail = body.get("error", body.get("detail", response.text)) if isinstance(body, dict) else response.text
    except ValueError:
        detail = response.text
    return response.status_code, detail if isinstance(detail, str) else str(detail)
