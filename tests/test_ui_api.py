"""The web UI's API (no browser): workspace confinement, the token, the job queue and its survival of restarts.

Jobs run the real worker process on the shipped toy base (a few optimizer steps each)."""

import os
import signal
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from lora_scripts.ui.jobs import JobQueue
from lora_scripts.ui.server import create_app
from lora_scripts.ui.workspace import Workspace

HEADERS = {"X-Requested-With": "test"}


@pytest.fixture()
def ws(tmp_path):
    create_app(tmp_path / "ws", run_queue=False)  # seeds the toy world: models/, data/neon_lab, demo_neon_lab.yaml
    return tmp_path / "ws"


def client(ws, **kw) -> TestClient:
    return TestClient(create_app(ws, **kw), base_url="http://127.0.0.1:7860")


def write_config(ws: Path, name: str, **changes) -> str:
    raw = yaml.safe_load((ws / "demo_neon_lab.yaml").read_text())
    raw.update({"output_dir": f"./output/{name}", "save_steps": 0, "verify_after_training": False, **changes})
    (ws / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return f"{name}.yaml"


def wait_for(predicate, timeout=120.0, every=0.25):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


# --- workspace confinement -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["../secret.txt", "/etc/passwd", "data/../../secret.txt", "link/secret.txt",
                                  "linked.txt", "%2e%2e/secret.txt", "..%2fsecret.txt", "data/%2E%2E/%2E%2E/secret.txt"])
def test_paths_outside_the_workspace_are_refused(ws, path):
    (ws.parent / "secret.txt").write_text("not for you")
    (ws / "link").symlink_to(ws.parent, target_is_directory=True)
    (ws / "linked.txt").symlink_to(ws.parent / "secret.txt")
    with client(ws, run_queue=False) as c:
        # the raw query string: %2e%2e is decoded by the framework before our check, which sees '..'
        r = c.get(f"/api/file?path={path}")
        assert r.status_code in (403, 404), r.text
        assert "not for you" not in r.text
        r = c.get("/api/config", params={"path": path.replace("secret.txt", "x.yaml")})
        assert r.status_code in (403, 404)
        # JSON bodies are not URL-decoded; what a script could send there is the decoded form
        evil = unquote(path).replace("secret.txt", "evil.yaml")
        r = c.put("/api/config", json={"path": evil, "values": {}}, headers=HEADERS)
        assert r.status_code == 403, r.text
    assert not (ws.parent / "evil.yaml").exists()


def test_files_inside_the_workspace_are_served(ws):
    with client(ws, run_queue=False) as c:
        r = c.get("/api/file", params={"path": "data/neon_lab/neon_000.png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert c.get("/api/file", params={"path": "models/toy-sd15.safetensors"}).status_code == 404  # not served


def test_config_paths_must_stay_in_the_workspace(ws):
    with client(ws, run_queue=False) as c:
        values = c.get("/api/config", params={"path": "demo_neon_lab.yaml"}).json()["values"]
        values["output_dir"] = "../../elsewhere"
        r = c.post("/api/config/validate", json={"path": "demo_neon_lab.yaml", "values": values}, headers=HEADERS).json()
        assert not r["ok"] and "outside the workspace" in r["fields"]["output_dir"][0]


def test_changes_need_the_x_requested_with_header(ws):
    with client(ws, run_queue=False) as c:
        r = c.post("/api/jobs", json={"config": "demo_neon_lab.yaml"})
        assert r.status_code == 403 and "X-Requested-With" in r.json()["error"]


def test_foreign_host_header_is_refused(ws):
    with client(ws, run_queue=False) as c:
        assert c.get("/api/info", headers={"Host": "attacker.example"}).status_code == 403


def test_non_loopback_bind_requires_the_token(ws):
    with TestClient(create_app(ws, host="0.0.0.0", token="s3cret", run_queue=False), base_url="http://10.1.2.3:7860") as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/info", headers={"X-Token": "s3cret"}).status_code == 200
        # the printed address carries ?token=; it becomes a cookie and leaves the address bar
        r = c.get("/?token=s3cret", follow_redirects=False)
        assert r.status_code == 303 and "token" not in r.headers["location"]
        assert c.get("/api/info").status_code == 200  # the cookie now authenticates


def test_uploads_are_checked_and_size_limited(ws, monkeypatch):
    import io

    import lora_scripts.ui.api as api

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, "PNG")
    with client(ws, run_queue=False) as c:
        ok = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                    files=[("files", ("new.png", buf.getvalue(), "image/png"))])
        assert ok.status_code == 200 and (ws / "data/neon_lab/new.png").exists()
        fake = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                      files=[("files", ("fake.png", b"#!/bin/sh\nrm -rf /", "image/png"))])
        assert fake.status_code == 400 and "not a readable image" in fake.json()["error"]
        script = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                        files=[("files", ("run.sh", b"echo", "text/plain"))])
        assert script.status_code == 400
        escape = c.post("/api/upload", params={"folder": "../"}, headers=HEADERS,
                        files=[("files", ("x.png", buf.getvalue(), "image/png"))])
        assert escape.status_code == 403 and not (ws.parent / "x.png").exists()
        monkeypatch.setattr(api, "MAX_UPLOAD_BYTES", 100)
        big = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                     files=[("files", ("big.png", buf.getvalue(), "image/png"))])
        assert big.status_code == 413
    assert not (ws / "data/neon_lab/fake.png").exists() and not (ws / "data/neon_lab/big.png").exists()


# --- config editor and dataset -------------------------------------------------------------------------------
def test_validation_errors_are_the_clis_and_name_their_field(ws):
    from lora_scripts.config import load_config
    from lora_scripts.errors import ConfigError

    with client(ws, run_queue=False) as c:
        values = c.get("/api/config", params={"path": "demo_neon_lab.yaml"}).json()["values"]
        assert values["lora_rank"] == "8"
        bad = dict(values, lora_rank="-3", lr_sheduler="cosine")
        r = c.post("/api/config/validate", json={"path": "demo_neon_lab.yaml", "values": bad}, headers=HEADERS).json()
        assert not r["ok"]
        with pytest.raises(ConfigError) as cli:
            load_config(ws / "demo_neon_lab.yaml", ["lora_rank=-3", "lr_sheduler=cosine"])
        assert r["fields"]["lora_rank"] == [p for p in cli.value.problems if p.startswith("lora_rank")]
        assert "Did you mean 'lr_scheduler'" in r["fields"]["lr_sheduler"][0]
        good = c.put("/api/config", json={"path": "mine.yaml", "values": dict(values, lora_rank="4")},
                     headers=HEADERS).json()
        assert good["ok"] and good["saved"] == "mine.yaml"
    saved = yaml.safe_load((ws / "mine.yaml").read_text())
    assert saved["lora_rank"] == 4 and saved["base_model"] == "./models/toy-sd15.safetensors"
    assert load_config(ws / "mine.yaml").lora_rank == 4  # the file the UI writes is a normal config


def test_caption_edit_is_written_back_to_metadata_csv(ws):
    import csv

    with client(ws, run_queue=False) as c:
        items = c.get("/api/dataset", params={"config": "demo_neon_lab.yaml"}).json()["images"]
        assert len(items) == 60 and items[0]["caption"].startswith("a glowing")
        r = c.put("/api/caption", headers=HEADERS, json={"config": "demo_neon_lab.yaml", "image": items[3]["path"],
                                                         "caption": 'a "quoted", comma\nand newline'})
        assert r.status_code == 200
    with open(ws / "data/neon_lab/metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and rows[3]["text"] == 'a "quoted", comma and newline'
    assert rows[2]["text"] == items[2]["caption"] and rows[4]["text"] == items[4]["caption"]


def test_label_and_check_run_the_library(ws):
    (ws / "data/neon_lab/metadata.csv").unlink()
    with client(ws, run_queue=False) as c:
        r = c.post("/api/label", headers=HEADERS, json={"config": "demo_neon_lab.yaml", "trigger": "neonlab"}).json()
        assert r["written"] == 60
        caps = [i["caption"] for i in c.get("/api/dataset", params={"config": "demo_neon_lab.yaml"}).json()["images"]]
        assert all(cap.startswith("neonlab") for cap in caps)
        report = c.post("/api/check", headers=HEADERS, json={"config": "demo_neon_lab.yaml"}).json()
        assert report["ok"] and "exact duplicates" in report["text"]


# --- jobs ----------------------------------------------------------------------------------------------------
def _status(c, job_id):
    return c.get(f"/api/jobs/{job_id}").json()


def test_a_crashed_job_fails_and_the_next_one_still_runs(ws):
    slow = write_config(ws, "slow", max_train_steps=2000)
    quick = write_config(ws, "quick", max_train_steps=3)
    with client(ws) as c:
        first = c.post("/api/jobs", headers=HEADERS, json={"config": slow}).json()
        second = c.post("/api/jobs", headers=HEADERS, json={"config": quick}).json()
        assert second["status"] == "queued"
        running = wait_for(lambda: (j := _status(c, first["id"]))["progress"] and
                           j["progress"].get("phase") == "training" and j)
        os.kill(running["pid"], signal.SIGKILL)  # what the kernel's out-of-memory killer does
        failed = wait_for(lambda: (j := _status(c, first["id"]))["status"] == "failed" and j, timeout=30)
        assert "killed by signal 9" in failed["error"]
        done = wait_for(lambda: (j := _status(c, second["id"]))["status"] in ("done", "failed") and j)
        assert done["status"] == "done", done
        assert done["progress"]["step"] == 3 and done["lora"] == "output/quick/quick.safetensors"
        curves = c.get(f"/api/jobs/{second['id']}/curves").json()
        assert curves["steps"] == [1, 2, 3]
        assert c.get("/api/info").status_code == 200  # the server is unharmed
        _library_lists_the_lora_and_generates_with_it(c, ws)


def _library_lists_the_lora_and_generates_with_it(c, ws):
    from lora_scripts.pnginfo import read_parameters

    loras = {l["name"]: l for l in c.get("/api/loras").json()}
    assert set(loras) == {"quick"} and loras["quick"]["modules"] > 0 and not loras["quick"]["warnings"]
    assert c.get("/api/models").json() == ["models/toy-sd15.safetensors"]
    body = {"base_model": "models/toy-sd15.safetensors", "prompt": "a glowing cyan circle <lora:quick:0.8>",
            "seed": 3, "steps": 4}
    image = c.post("/api/generate", headers=HEADERS, json=body).json()["image"]
    params = read_parameters(ws / image)
    assert "Lora hashes" in params and "<lora:quick:0.8>" in params
    sweep = c.post("/api/generate", headers=HEADERS, json={**body, "strengths": [0, 1]}).json()["image"]
    assert Image.open(ws / sweep).width > Image.open(ws / image).width
    r = c.post("/api/generate", headers=HEADERS, json={**body, "prompt": "<lora:quic:1>"})
    assert r.status_code == 400 and "Did you mean: quick" in r.json()["error"]
    _tools_and_compare(c, ws)


def _tools_and_compare(c, ws):
    from lora_scripts.interop.lora_file import read_lora

    tool = {"lora": "output/quick/quick.safetensors", "base_model": "models/toy-sd15.safetensors"}
    verified = c.post("/api/loras/tool", headers=HEADERS, json={**tool, "action": "verify"}).json()
    assert verified["ok"], verified
    conv = c.post("/api/loras/tool", headers=HEADERS, json={**tool, "action": "convert", "to": "diffusers"}).json()
    assert conv["written"] == "output/quick/quick_diffusers.safetensors"
    again = c.post("/api/loras/tool", headers=HEADERS, json={**tool, "action": "convert", "to": "diffusers"})
    assert again.status_code == 400 and "already exists" in again.json()["error"]
    small = c.post("/api/loras/tool", headers=HEADERS, json={**tool, "action": "resize", "rank": 2}).json()
    assert small["written"] == "output/quick/quick_r2.safetensors" and "kept energy" in small["text"]
    assert {m.rank for m in read_lora(ws / small["written"]).modules.values()} == {2}
    escape = c.post("/api/loras/tool", headers=HEADERS, json={**tool, "lora": "../x.safetensors", "action": "verify"})
    assert escape.status_code == 403
    jobs = [j["id"] for j in c.get("/api/jobs").json() if j["status"] == "done"]
    r = c.post("/api/compare", headers=HEADERS, json={"jobs": jobs, "prompt": "a glowing cyan circle", "steps": 4})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (ws / out["sheet"]).is_file() and (ws / out["losses"]).is_file() and out["rows"][0]["steps"] == "3"


def test_a_job_with_bad_input_fails_with_the_clis_message(ws):
    (ws / "models/broken.safetensors").write_bytes(b"\0" * 100)
    bad = write_config(ws, "bad", base_model="./models/broken.safetensors")
    with client(ws) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": bad}).json()
        failed = wait_for(lambda: (j := _status(c, job["id"]))["status"] in ("failed", "done") and j)
        assert failed["status"] == "failed" and "broken.safetensors" in failed["error"]
        # an invalid config is refused at once, never queued
        (ws / "invalid.yaml").write_text("train_data_dir: ./data/neon_lab\nlora_rank: -1\n")
        r = c.post("/api/jobs", headers=HEADERS, json={"config": "invalid.yaml"})
        assert r.status_code == 400 and "lora_rank = -1" in r.json()["error"]


def test_stop_saves_a_checkpoint_and_resume_finishes(ws):
    cfg = write_config(ws, "stopme", max_train_steps=400, save_steps=0)
    with client(ws) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        wait_for(lambda: (_status(c, job["id"])["progress"] or {}).get("step", 0) >= 2)
        c.post(f"/api/jobs/{job['id']}/stop", headers=HEADERS)
        stopped = wait_for(lambda: (j := _status(c, job["id"]))["status"] not in ("running", "queued") and j)
        assert stopped["status"] == "stopped" and "checkpoint saved" in stopped["error"]
        step = stopped["progress"]["step"]
        assert (ws / f"output/stopme/checkpoints/step-{step}").is_dir()
        ws_cfg = yaml.safe_load((ws / cfg).read_text())
        ws_cfg["max_train_steps"] = step + 2  # finish soon after the resume
        (ws / cfg).write_text(yaml.safe_dump(ws_cfg))
        c.post(f"/api/jobs/{job['id']}/resume", headers=HEADERS)
        done = wait_for(lambda: (j := _status(c, job["id"]))["status"] in ("done", "failed") and j)
        assert done["status"] == "done", done
        assert c.get(f"/api/jobs/{job['id']}/curves").json()["steps"] == list(range(1, step + 3))


def test_job_list_survives_a_server_restart(ws):
    queue = JobQueue(Workspace(ws))
    a = queue.submit("demo_neon_lab.yaml")
    b = queue.submit("demo_neon_lab.yaml")
    queue.store.update(b.id, status="done", finished=time.time(), lora="output/neon_lab/neon_lab.safetensors")
    c_ = queue.submit("demo_neon_lab.yaml")
    # a job that was running when the server died; its process is gone too
    queue.store.update(c_.id, status="running", pid=2**22 + 12345, started=time.time())
    with client(ws, run_queue=False) as c:
        c.app.state.queue.recover()
        jobs = {j["id"]: j for j in c.get("/api/jobs").json()}
    assert [jobs[i]["status"] for i in (a.id, b.id, c_.id)] == ["queued", "done", "interrupted"]
    assert jobs[b.id]["lora"] == "output/neon_lab/neon_lab.safetensors"
    assert "resume" in jobs[c_.id]["error"]


def test_model_labellers_take_a_model_folder_inside_the_workspace(ws, tmp_path):
    from test_label import _tiny_wd14

    _tiny_wd14(ws / "models" / "wd14")
    _tiny_wd14(tmp_path / "outside_wd14")
    Image.new("RGB", (32, 32), (250, 10, 10)).save(ws / "data/neon_lab/red.png")  # the tiny tagger's "red thing"
    with client(ws, run_queue=False) as c:
        body = {"config": "demo_neon_lab.yaml", "backend": "wd14", "overwrite": True, "trigger": "neonlab"}
        outside = c.post("/api/label", headers=HEADERS, json={**body, "model": str(tmp_path / "outside_wd14")})
        assert outside.status_code == 403
        r = c.post("/api/label", headers=HEADERS, json={**body, "model": "models/wd14"})
        assert r.status_code == 200 and r.json()["written"] == 61
        caps = {Path(i["path"]).name: i["caption"]
                for i in c.get("/api/dataset", params={"config": "demo_neon_lab.yaml"}).json()["images"]}
        # the tagger sees mean colour: the dark neon images get no tag, the red square its two red tags
        assert caps.pop("red.png") in ("neonlab, red thing, some character", "neonlab, some character, red thing")
        assert set(caps.values()) == {"neonlab"}
        check = c.post("/api/check", headers=HEADERS, json={"config": "demo_neon_lab.yaml", "vram_gb": 0.001}).json()
        assert "exceeds the 0.001 GB available" in check["text"]


def test_a_workspace_with_files_is_not_seeded(tmp_path):
    own = tmp_path / "mine"
    own.mkdir()
    (own / "photo.png").write_bytes(b"")
    create_app(own, run_queue=False)
    assert sorted(p.name for p in own.iterdir()) == [".lora-scripts-ui", "photo.png"]
