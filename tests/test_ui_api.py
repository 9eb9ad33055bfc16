"""The web UI's API (no browser): workspace confinement, the token, the job queue and its survival of restarts.

Jobs run the real worker process on the shipped toy base (a few optimizer steps each)."""

import json
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


# A deadline only (a passing wait returns as soon as its condition holds): generous, so that a slow or busy
# machine (two test workers on two cores) cannot fail a test that would pass given the time.
def wait_for(predicate, timeout=600.0, every=0.25):
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

    import lora_scripts.ui.uploads as uploads

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
        monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 100)
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
    slow = write_config(ws, "slow", max_train_steps=100_000)  # still running when killed, however fast the machine
    quick = write_config(ws, "quick", max_train_steps=3)
    with client(ws) as c:
        first = c.post("/api/jobs", headers=HEADERS, json={"config": slow}).json()
        second = c.post("/api/jobs", headers=HEADERS, json={"config": quick}).json()
        assert second["status"] == "queued"
        running = wait_for(lambda: (j := _status(c, first["id"]))["progress"] and
                           j["progress"].get("phase") == "training" and j)
        os.kill(running["pid"], signal.SIGKILL)  # what the kernel's out-of-memory killer does
        failed = wait_for(lambda: (j := _status(c, first["id"]))["status"] == "failed" and j)
        assert "killed by signal 9" in failed["error"]
        done = wait_for(lambda: (j := _status(c, second["id"]))["status"] in ("done", "failed") and j)
        assert done["status"] == "done", done
        assert done["progress"]["step"] == 3 and done["lora"] == "output/quick/quick.safetensors"
        curves = c.get(f"/api/jobs/{second['id']}/curves").json()
        assert curves["steps"] == [1, 2, 3]
        assert c.get("/api/info").status_code == 200  # the server is unharmed
        _library_lists_the_lora_and_generates_with_it(c, ws)


def _library_lists_the_lora_and_generates_with_it(c, ws):
    from lora_scripts.generation.pnginfo import read_parameters

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
    # Never finishes by itself however fast the machine: Stop always lands mid-run.
    cfg = write_config(ws, "stopme", max_train_steps=100_000, save_steps=0)
    with client(ws) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        wait_for(lambda: (_status(c, job["id"])["progress"] or {}).get("step", 0) >= 2)
        c.post(f"/api/jobs/{job['id']}/stop", headers=HEADERS)
        stopped = wait_for(lambda: (j := _status(c, job["id"]))["status"] not in ("running", "queued") and j)
        assert stopped["status"] == "stopped" and "checkpoint saved" in stopped["error"]
        # The worker reports the step Stop saved (unthrottled) before it writes exit.json, which is what the
        # server reads to call the job stopped: no timing involved.
        step = stopped["progress"]["step"]
        assert stopped["progress"]["saved"] and step >= 2
        assert sorted(p.name for p in (ws / "output/stopme/checkpoints").iterdir()) == [f"step-{step}"]
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


# --- workspace confinement of jobs (issue 16) ----------------------------------------------------------------
def test_a_job_whose_lora_would_land_outside_the_workspace_is_refused(ws):
    cfg = write_config(ws, "escape", output_name="../../../escape/pwned", max_train_steps=1)
    with client(ws, run_queue=False) as c:
        r = c.post("/api/jobs", headers=HEADERS, json={"config": cfg})
        assert r.status_code == 400 and "output_name" in r.json()["error"], r.text
        assert c.get("/api/jobs").json() == []  # never queued
        values = c.get("/api/config", params={"path": cfg}).json()["values"]
        v = c.post("/api/config/validate", headers=HEADERS, json={"path": cfg, "values": values}).json()
        assert not v["ok"] and any("output_name" in m for m in v["fields"]["output_name"])
    assert not (ws.parent.parent / "escape").exists() and not (ws.parent / "escape").exists()


def test_the_ui_checks_every_path_a_run_reads_or_writes(ws, tmp_path):
    from lora_scripts.config import load_config
    from lora_scripts.ui.workspace import config_escapes

    root = Workspace(ws).root
    (tmp_path / "elsewhere").mkdir()
    (ws / "output").mkdir(exist_ok=True)
    (ws / "output/linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (ws / "output/lora_link").mkdir()
    (ws / "output/lora_link/lora_link.safetensors").symlink_to(tmp_path / "elsewhere/x.safetensors")
    (ws / "output/logs_link").mkdir()
    (ws / "output/logs_link/logs").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    cases = {"output_dir": str(tmp_path / "out"), "logging_dir": "../logs", "cache_dir": "/tmp/cache",
             "base_model": str(root / "models/../../toy.safetensors"), "validation_dir": str(tmp_path / "elsewhere")}
    for key, value in cases.items():
        if key == "base_model":
            (tmp_path / "toy.safetensors").write_bytes((ws / "models/toy-sd15.safetensors").read_bytes())
        config = load_config(ws / write_config(ws, f"bad_{key}"), {key: value})
        assert set(config_escapes(config, root)) == {key}, key
    # a link inside the workspace that leads out counts as outside: the folder, the LoRA file, the default logs
    for name, key in (("linked", "output_dir"), ("lora_link", "output_name"), ("logs_link", "logging_dir")):
        linked = load_config(ws / write_config(ws, name, output_dir=f"./output/{name}"))
        assert set(config_escapes(linked, root)) == {key}, name
    # the UI's own folder is off limits for a run's files
    state = load_config(ws / write_config(ws, "state", output_dir="./.lora-scripts-ui/jobs/1"))
    assert "the UI's own folder" in config_escapes(state, root)["output_dir"]
    assert config_escapes(load_config(ws / "demo_neon_lab.yaml"), root) == {}
    # output_name is checked by the UI itself too, whatever the config module accepts
    from lora_scripts.ui.workspace import path_escapes

    for name in ("../../../escape/pwned", "sub/name", "..", "a\\b", "C:evil"):
        assert set(path_escapes({"output_dir": root / "output/x"}, root, name)) == {"output_name"}, name
    assert path_escapes({"output_dir": root / "output/x"}, root, "my_lora.v2") == {}


def test_a_refused_config_save_writes_nothing_and_the_job_runs_what_was_validated(ws, tmp_path, monkeypatch):
    import subprocess

    import lora_scripts.ui.jobs as jobs_module
    from lora_scripts.config import load_config

    cfg = write_config(ws, "edited", max_train_steps=3)
    original = (ws / cfg).read_bytes()
    with client(ws, run_queue=False) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        values = c.get("/api/config", params={"path": cfg}).json()["values"]
        for key, value in (("output_dir", str(tmp_path / "stolen")), ("base_model", "../../x.safetensors")):
            r = c.put("/api/config", headers=HEADERS, json={"path": cfg, "values": {**values, key: value}})
            assert r.status_code == 403 and "outside the workspace" in r.json()["error"] and r.json()["saved"] is None
            assert (ws / cfg).read_bytes() == original  # a refused write writes nothing
        # edited behind the server's back (a text editor): the queued job still runs the copy validated at submit
        (ws / cfg).write_text((ws / cfg).read_text().replace("./output/edited", str(tmp_path / "stolen")))
        launched = []

        class FakeProcess:
            pid = os.getpid()

            def __init__(self, cmd, **kw):
                launched.append(cmd)

            def poll(self):
                return None

        monkeypatch.setattr(jobs_module.subprocess, "Popen", FakeProcess)
        c.app.state.queue.tick()
        monkeypatch.setattr(jobs_module.subprocess, "Popen", subprocess.Popen)
    [cmd] = launched
    snapshot = ws / f".lora-scripts-ui/jobs/{job['id']}/config.yaml"
    assert cmd[cmd.index("lora_scripts.ui.worker") + 2] == str(snapshot) and str(ws / cfg) not in cmd
    assert cmd[cmd.index("--workspace") + 1] == str(Workspace(ws).root)
    assert load_config(snapshot).output_dir == (ws / "output/edited").resolve()
    # the snapshot itself cannot be rewritten through the API
    with client(ws, run_queue=False) as c:
        r = c.put("/api/config", headers=HEADERS, json={"path": snapshot.relative_to(ws).as_posix(), "values": values})
        assert r.status_code == 403 and "UI's own folder" in r.json()["error"]


def test_the_worker_refuses_a_config_that_leaves_the_workspace(ws, tmp_path, tiny_ckpt):
    import json

    from lora_scripts.ui.worker import run

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    snapshot = job_dir / "config.yaml"
    raw = yaml.safe_load((ws / "demo_neon_lab.yaml").read_text())
    raw.update(train_data_dir=str(ws / "data/neon_lab"), metadata_path=str(ws / "data/neon_lab/metadata.csv"),
               base_model=str(tiny_ckpt), output_dir=str(tmp_path / "stolen"))
    snapshot.write_text(yaml.safe_dump(raw))
    assert run(job_dir, snapshot, False, Workspace(ws).root) == 2
    result = json.loads((job_dir / "exit.json").read_text())
    assert result["status"] == "failed" and "leaves the workspace" in result["error"]
    assert "base_model" in result["error"] and "output_dir" in result["error"]
    assert not (tmp_path / "stolen").exists()


def test_resume_validates_the_config_again(ws):
    cfg = write_config(ws, "again", max_train_steps=3)
    with client(ws, run_queue=False) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        c.app.state.queue.store.update(job["id"], status="stopped")
        raw = yaml.safe_load((ws / cfg).read_text())
        (ws / cfg).write_text(yaml.safe_dump({**raw, "output_dir": "../../elsewhere"}))
        r = c.post(f"/api/jobs/{job['id']}/resume", headers=HEADERS)
        assert r.status_code == 400 and "output_dir" in r.json()["error"] and "outside the workspace" in r.json()["error"]
        assert _status(c, job["id"])["status"] == "stopped"
        snapshot = yaml.safe_load((ws / f".lora-scripts-ui/jobs/{job['id']}/config.yaml").read_text())
        assert snapshot["output_dir"] == str(Workspace(ws).root / "output/again")  # the validated copy is untouched


# --- captions and uploads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".png", "png", ".yaml", ".PNG"])
def test_a_caption_is_never_written_over_an_image_or_as_a_config(ws, ext):
    data = ws / "data/neon_lab"
    (data / "metadata.csv").unlink()
    image = data / "neon_003.png"
    before = image.read_bytes()
    raw = yaml.safe_load((ws / "demo_neon_lab.yaml").read_text())
    raw.pop("metadata_path")
    (ws / "side.yaml").write_text(yaml.safe_dump({**raw, "caption_extension": ext}))
    with client(ws, run_queue=False) as c:
        r = c.put("/api/caption", headers=HEADERS,
                  json={"config": "side.yaml", "image": "data/neon_lab/neon_003.png", "caption": "a caption"})
        assert r.status_code == 400 and "caption_extension" in r.json()["error"], r.text
        assert c.get("/api/dataset", params={"config": "side.yaml"}).status_code == 400
        configs = c.get("/api/info").json()["configs"]
    assert image.read_bytes() == before
    assert not list(data.glob("*.yaml")) and not any(p.startswith("data/") for p in configs)


def test_caption_edits_go_to_text_files_only(ws):
    raw = yaml.safe_load((ws / "demo_neon_lab.yaml").read_text())
    (ws / "meta_png.yaml").write_text(yaml.safe_dump({**raw, "metadata_path": "./data/neon_lab/neon_001.png"}))
    before = (ws / "data/neon_lab/neon_001.png").read_bytes()
    with client(ws, run_queue=False) as c:
        r = c.put("/api/caption", headers=HEADERS,
                  json={"config": "meta_png.yaml", "image": "data/neon_lab/neon_003.png", "caption": "x"})
        assert r.status_code == 400 and "metadata_path" in r.json()["error"]
        r = c.put("/api/caption", headers=HEADERS,
                  json={"config": "demo_neon_lab.yaml", "image": "data/neon_lab", "caption": "x"})
        assert r.status_code == 400 and "not an image file" in r.json()["error"]
    assert (ws / "data/neon_lab/neon_001.png").read_bytes() == before


def _png(color, size=40) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def test_an_upload_never_replaces_an_existing_image(ws):
    data = ws / "data/neon_lab"
    before = (data / "neon_000.png").read_bytes()
    with client(ws, run_queue=False) as c:
        r = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                   files=[("files", ("neon_000.png", _png("red"), "image/png")),
                          ("files", ("neon_001.png", (data / "neon_001.png").read_bytes(), "image/png"))])
        assert r.status_code == 200, r.text
        out = r.json()
    assert (data / "neon_000.png").read_bytes() == before
    assert (data / "neon_000_2.png").read_bytes() == _png("red")
    assert out["saved"] == ["data/neon_lab/neon_000_2.png"] and out["skipped"] == ["neon_001.png"]
    assert out["renamed"] == [{"from": "neon_000.png", "to": "data/neon_lab/neon_000_2.png"}]
    assert "saved as neon_000_2.png" in out["notes"][0] and "already there" in out["notes"][1]
    assert not (data / "neon_001_2.png").exists()


def _asgi_upload(app, chunks, headers):
    """POST /api/upload straight through ASGI, one body chunk per receive(); returns (status, body, chunks read).
    TestClient reads the whole body before the app runs, so it cannot show when the app stops reading."""
    import asyncio
    import json

    read, sent = [0], {}

    async def receive():
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] = sent.get("body", b"") + message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/upload", "raw_path": b"/api/upload", "query_string": b"folder=data/neon_lab",
             "root_path": "", "server": ("127.0.0.1", 7860), "client": ("127.0.0.1", 50000),
             "headers": [(b"host", b"127.0.0.1:7860"), (b"x-requested-with", b"test")] +
                        [(k.encode(), v.encode()) for k, v in headers.items()]}

    async def go():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(go())
    return sent["status"], json.loads(sent["body"]), read[0]


def test_uploads_are_refused_as_soon_as_a_limit_is_passed(ws, monkeypatch):
    import lora_scripts.ui.uploads as uploads

    boundary = "XyZ"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    chunks = [head] + [b"\0" * 1024] * 200 + [f"\r\n--{boundary}--\r\n".encode()]
    ctype = {"content-type": f"multipart/form-data; boundary={boundary}"}
    app = create_app(ws, run_queue=False)
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 4096)
    status, body, read = _asgi_upload(app, chunks, ctype)  # no Content-Length: counted while streaming
    assert status == 413 and "big.png: larger than" in body["error"] and read < 10
    monkeypatch.setattr(uploads, "MAX_REQUEST_BYTES", 10_000)
    status, body, read = _asgi_upload(app, chunks, {**ctype, "content-length": str(sum(map(len, chunks)))})
    assert status == 413 and "smaller batches" in body["error"] and read == 0  # refused on the header alone
    assert not (ws / "data/neon_lab/big.png").exists() and not list((ws / ".lora-scripts-ui/uploads").glob("*"))


def test_decompression_bombs_are_refused_by_name(ws):
    from helpers.bad_inputs import _huge_png

    (ws / "data/neon_lab/huge.png").write_bytes(_huge_png())
    with client(ws, run_queue=False) as c:
        r = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                   files=[("files", ("bomb.png", _huge_png(), "image/png"))])
        assert r.status_code == 400 and "bomb.png: image too large" in r.json()["error"]
        r = c.post("/api/upload", params={"folder": "data/neon_lab"}, headers=HEADERS,
                   files=[("files", ("big.png", _huge_png(9000, 9000), "image/png"))])  # under PIL's own limit
        assert r.status_code == 400 and "big.png: image too large (9000x9000" in r.json()["error"]
        r = c.get("/api/file", params={"path": "data/neon_lab/huge.png"})
        assert r.status_code == 422 and "huge.png: image too large" in r.json()["error"]
        assert c.get("/api/dataset", params={"config": "demo_neon_lab.yaml"}).status_code == 200
    assert not (ws / "data/neon_lab/bomb.png").exists() and not (ws / "data/neon_lab/big.png").exists()


# --- links leading out, odd ids, Stop at start-up ------------------------------------------------------------
def test_links_leading_out_are_listed_as_refused_not_a_500(ws, tmp_path):
    (tmp_path / "secret.png").write_bytes(_png("blue"))
    (tmp_path / "secret.txt").write_text("not for you")
    (ws / "data/neon_lab/evil.png").symlink_to(tmp_path / "secret.png")
    (ws / "output/x").mkdir(parents=True)
    (ws / "output/x/stolen.safetensors").symlink_to(ws / "models/toy-sd15.safetensors")  # inside: fine
    (ws / "output/x/outside.safetensors").symlink_to(tmp_path / "outside.safetensors")
    import shutil

    shutil.copy(ws / "models/toy-sd15.safetensors", tmp_path / "outside.safetensors")
    with client(ws, run_queue=False) as c:
        r = c.get("/api/dataset", params={"config": "demo_neon_lab.yaml"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["images"]) == 60 and "not for you" not in r.text
        assert body["refused"] == [{"path": "data/neon_lab/evil.png",
                                    "reason": "a link to a file outside the workspace; not shown"}]
        r = c.get("/api/loras")
        assert r.status_code == 200, r.text
        refused = [l for l in r.json() if l.get("refused")]
        assert [l["path"] for l in refused] == ["output/x/outside.safetensors"]
        models = c.get("/api/models")
        assert models.status_code == 200 and "output/x/outside.safetensors" not in models.json()
    # sidecar captions: a caption file that links out is not read into the page
    raw = yaml.safe_load((ws / "demo_neon_lab.yaml").read_text())
    raw.pop("metadata_path")
    (ws / "side.yaml").write_text(yaml.safe_dump(raw))
    for p in (ws / "data/neon_lab").glob("*.png"):
        p.with_suffix(".txt").write_text("a caption")
    (ws / "data/neon_lab/neon_002.txt").unlink()
    (ws / "data/neon_lab/neon_002.txt").symlink_to(tmp_path / "secret.txt")
    with client(ws, run_queue=False) as c:
        r = c.get("/api/dataset", params={"config": "side.yaml"})
        assert r.status_code == 200 and "not for you" not in r.text
        assert {x["path"] for x in r.json()["refused"]} == {"data/neon_lab/evil.png", "data/neon_lab/neon_002.png"}


@pytest.mark.parametrize("job_id", ["99999999999999999999999", "9223372036854775808", "0", "-1"])
def test_any_job_id_that_names_no_job_is_a_404(ws, job_id):
    with client(ws, run_queue=False) as c:
        for method, url in (("GET", ""), ("GET", "/curves"), ("POST", "/stop"), ("POST", "/resume")):
            r = c.request(method, f"/api/jobs/{job_id}{url}", headers=HEADERS)
            assert r.status_code == 404 and f"no job {job_id}" in r.json()["error"], (url, r.text)
        r = c.post("/api/compare", headers=HEADERS, json={"jobs": [int(job_id)], "prompt": "x"})
        assert r.status_code == 404


def test_stop_while_the_worker_starts_ends_as_stopped(ws):
    cfg = write_config(ws, "early", max_train_steps=100_000)
    with client(ws) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        wait_for(lambda: _status(c, job["id"])["pid"], every=0.02)  # launched: still importing torch
        c.post(f"/api/jobs/{job['id']}/stop", headers=HEADERS)
        ended = wait_for(lambda: (j := _status(c, job["id"]))["status"] not in ("running", "queued") and j)
    assert ended["status"] == "stopped", ended
    assert not (ws / "output/early/checkpoints").exists()
    assert (ws / ".lora-scripts-ui" / "jobs" / str(job["id"]) / "stop-requested").is_file()  # written before SIGINT


def test_a_stop_whose_signal_start_up_lost_is_read_from_the_job_folder(tmp_path):
    """A worker that inherited SIGINT ignored (a server started in the background by a script; pytest-xdist's
    workers) loses a SIGINT sent before its handler is in place, and then trained on as if never stopped (seen in
    CI: 22 minutes of a 100,000-step job). The server writes stop-requested before the signal; the worker reads it
    once its handler is in place and ends as stopped."""
    from lora_scripts.ui.worker import STOP_REQUESTED, run

    (tmp_path / STOP_REQUESTED).touch()
    assert run(tmp_path, tmp_path / "never-read.yaml", False, tmp_path) == 130
    assert json.loads((tmp_path / "exit.json").read_text())["status"] == "stopped"


def test_a_stop_during_the_workers_imports_is_kept_until_they_are_done(tmp_path):
    """A KeyboardInterrupt raised inside a library import can be swallowed there (the job then trained on as if
    never stopped): while importing, Stop is only remembered; it ends the start-up once the imports are done,
    and a Stop that start-up still lost is sent again to the trainer's own handler at the first progress report."""
    from lora_scripts.training.loop import Progress
    from lora_scripts.ui.worker import ProgressFile, StartupStop

    stop = StartupStop()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # while importing: nothing is raised
        time.sleep(0.05)
        assert stop.pending
        with pytest.raises(KeyboardInterrupt):
            stop.imports_done()
        seen = []
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # the trainer's handler
        ProgressFile(tmp_path / "progress.json", stop=stop)(Progress(1, 10, 0, 1, 0.5, 1e-4, 1.0, 9.0))
        time.sleep(0.05)
        assert seen == [signal.SIGINT] and not stop.pending
    finally:
        signal.signal(signal.SIGINT, previous)


def test_studio_draws_from_an_sd2_file_that_does_not_say_its_objective(ws, tiny_sd2_ckpt):
    """An SD2 single file that does not say what it predicts is refused until the page says it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_sd2_ckpt), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        configs = json.loads(f.metadata()["lora_scripts.architecture"])
    # The tiny file keeps its (tiny) configs, as it must to load; like a user's SD2 file it no longer says v.
    del configs["scheduler"]["prediction_type"]
    save_file(state, str(ws / "models" / "sd2.safetensors"), {"lora_scripts.architecture": json.dumps(configs)})
    c = client(ws)
    body = {"base_model": "models/sd2.safetensors", "prompt": "a lab", "seed": 1, "steps": 2}
    r = c.post("/api/generate", headers=HEADERS, json=body)
    assert r.status_code == 400 and "prediction_type" in r.json()["error"]
    image = c.post("/api/generate", headers=HEADERS, json={**body, "prediction_type": "v_prediction"}).json()["image"]
    assert (ws / image).is_file()


def test_an_sdxl_run_from_the_queue_is_listed_and_drawn_with_in_the_studio(ws, tiny_sdxl_ckpt):
    """The web UI over an SDXL base: the job trains through the same library, the library page names the file's
    family and verifies it, and the studio draws with it."""
    import shutil

    # The base shares the run's name: a full checkpoint never takes a LoRA's name (it used to hide the LoRA).
    shutil.copy(tiny_sdxl_ckpt, ws / "models" / "xl.safetensors")
    cfg = write_config(ws, "xl", base_model="./models/xl.safetensors", max_train_steps=2, resolution=64,
                       train_text_encoder=True)
    with client(ws) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        done = wait_for(lambda: (j := _status(c, job["id"]))["status"] in ("done", "failed", "stopped") and j)
        assert done["status"] == "done", done
        listed = {item["name"]: item for item in c.get("/api/loras").json()}
        assert listed["xl"]["family"] == "sdxl"
        report = c.post("/api/loras/tool", headers=HEADERS,
                        json={"lora": "output/xl/xl.safetensors", "action": "verify", "base_model": "models/xl.safetensors"})
        assert report.status_code == 200 and "0 unmatched" in json.dumps(report.json())
        body = {"base_model": "models/xl.safetensors", "prompt": "a lab <lora:xl:0.8>", "seed": 1, "steps": 2}
        image = c.post("/api/generate", headers=HEADERS, json=body).json()["image"]
        assert (ws / image).is_file()


def test_flux_as_comfyui_keeps_it_trains_draws_verifies_and_compares_in_the_ui(ws, tiny_flux_files):
    """A ComfyUI tree in the workspace: the job trains on the config's clip_l/t5xxl/ae; the base list shows the
    transformer, not its other files; the studio, verify and compare find those beside it (T5's tokenizer in
    the ComfyUI install) and draw at Flux.1-dev's own guidance where the page leaves it open."""
    import shutil

    from lora_scripts.generation.pnginfo import parse_parameters, read_parameters

    comfy = ws / "ComfyUI"
    layout = {"base_model": "models/diffusion_models/flux1-dev.safetensors", "clip_l": "models/text_encoders/clip_l.safetensors",
              "t5xxl": "models/text_encoders/t5xxl_fp16.safetensors", "ae": "models/vae/ae.safetensors"}
    for key, rel in layout.items():
        (comfy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_flux_files[key], comfy / rel)
    shutil.copytree(tiny_flux_files["tokenizer_dir"], comfy / "comfy" / "text_encoders" / "t5_tokenizer")
    # The workspace's demo config trains LoCon, which a transformer without convolutions refuses: a Flux config
    # says lora (and the demo's Lion learning rate goes with it).
    cfg = write_config(ws, "fx", **{k: f"./ComfyUI/{v}" for k, v in layout.items()}, max_train_steps=2,
                       network_type="lora",
                       resolution=32, lora_rank=4)
    with client(ws) as c:
        job = c.post("/api/jobs", headers=HEADERS, json={"config": cfg}).json()
        done = wait_for(lambda: (j := _status(c, job["id"]))["status"] in ("done", "failed", "stopped") and j)
        assert done["status"] == "done", done
        models = c.get("/api/models").json()
        assert "ComfyUI/" + layout["base_model"] in models and not any("text_encoders" in m or "vae" in m for m in models)
        assert {item["name"]: item for item in c.get("/api/loras").json()}["fx"]["family"] == "flux1"
        base = "ComfyUI/" + layout["base_model"]
        report = c.post("/api/loras/tool", headers=HEADERS,
                        json={"lora": "output/fx/fx.safetensors", "action": "verify", "base_model": base})
        assert report.status_code == 200 and report.json()["ok"], report.json()
        image = c.post("/api/generate", headers=HEADERS,
                       json={"base_model": base, "prompt": "a lab <lora:fx:0.8>", "seed": 1, "steps": 2,
                             "size": "32x32"}).json()["image"]
        info = parse_parameters(read_parameters(ws / image))
        assert info["CFG scale"] == "3.5" and info["Lora hashes"].startswith("fx: ")
        out = c.post("/api/compare", headers=HEADERS, json={"jobs": [job["id"]], "prompt": "a lab", "steps": 2,
                                                            "size": "32x32"}).json()
        assert (ws / out["sheet"]).is_file()
        # A file named on the page that is not the kind its key says: the loader's message, not a traceback.
        bad = c.post("/api/generate", headers=HEADERS, json={"base_model": base, "prompt": "a lab", "steps": 2, "size": "32x32",
                                                             "clip_l": "ComfyUI/" + layout["t5xxl"]})
        assert bad.status_code == 400 and "this is a T5 text encoder" in bad.json()["error"]
