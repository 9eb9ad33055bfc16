// lora-scripts web UI: plain JavaScript talking to /api (no framework, no build step).
"use strict";
const $ = (sel) => document.querySelector(sel);
const state = { schema: [], config: null, jobId: null, pollTimer: null, validateTimer: null };

async function api(method, url, body) {
  const opts = { method, headers: { "X-Requested-With": "lora-scripts" } };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const res = await fetch(url, opts);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}
const fileUrl = (path) => "/api/file?path=" + encodeURIComponent(path) + "&t=" + Date.now();
function setStatus(el, text, kind) { el.textContent = text; el.className = "status " + (kind || ""); }
function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of [].concat(children)) node.append(c);
  return node;
}

// --- tabs ---------------------------------------------------------------------------------------------------
function showTab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.id === "tab-" + name));
  if (name === "dataset") loadDataset();
  if (name === "jobs") refreshJobs();
  if (name === "library") loadLibrary();
}
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

// --- config editor ------------------------------------------------------------------------------------------
function fieldInput(f) {
  let input;
  if (f.kind === "bool") input = el("input", { type: "checkbox", checked: !!f.default });
  else if (f.kind === "choice") input = el("select", {}, f.choices.map((c) => el("option", { value: c, textContent: c })));
  else input = el("input", { type: "text", placeholder: f.required ? "required" : (f.default === "" ? "(empty)" : f.default) });
  input.name = f.name; input.id = "field-" + f.name;
  input.addEventListener(f.kind === "text" ? "input" : "change", scheduleValidate);
  return input;
}
function buildForm() {
  for (const f of state.schema) {
    const help = el("div", { className: "help" }, [f.help]);
    if (f.typical) help.append(el("span", { className: "typical", textContent: "  typical: " + f.typical }));
    const box = el("div", { className: "field", id: "box-" + f.name }, [
      el("label", { htmlFor: "field-" + f.name }, [f.name, fieldInput(f)]), help,
      el("div", { className: "error", id: "err-" + f.name })]);
    (f.essential ? $("#essential") : $("#advanced")).append(box);
  }
}
function formValues() {
  const values = {};
  for (const f of state.schema) {
    const input = document.getElementById("field-" + f.name);
    if (f.kind === "bool") { if (input.checked !== f.default) values[f.name] = input.checked; }
    else if (input.value !== "" && !(f.kind === "choice" && input.value === f.default)) values[f.name] = input.value;
  }
  return values;
}
function fillForm(values) {
  for (const f of state.schema) {
    const input = document.getElementById("field-" + f.name);
    const v = values[f.name];
    if (f.kind === "bool") input.checked = v === undefined ? f.default : !!v;
    else if (f.kind === "choice") input.value = v === undefined ? f.default : v;
    else input.value = v === undefined ? "" : v;
  }
  const unknown = Object.keys(values).filter((k) => !state.schema.some((f) => f.name === k));
  state.unknown = Object.fromEntries(unknown.map((k) => [k, values[k]]));
}
function showErrors(result) {
  for (const f of state.schema) {
    const msgs = (result.fields || {})[f.name] || [];
    document.getElementById("err-" + f.name).textContent = msgs.join("\n");
    document.getElementById("box-" + f.name).classList.toggle("invalid", msgs.length > 0);
  }
  const other = Object.entries(result.fields || {}).filter(([k]) => !state.schema.some((f) => f.name === k))
    .flatMap(([, m]) => m);
  $("#config-general").textContent = [...other, ...(result.general || [])].join("\n");
  setStatus($("#config-status"), result.ok ? "config is valid" : "fix the fields marked in red", result.ok ? "good" : "bad");
}
function allValues() { return { ...(state.unknown || {}), ...formValues() }; }
function scheduleValidate() {
  clearTimeout(state.validateTimer);
  state.validateTimer = setTimeout(async () => {
    try { showErrors(await api("POST", "/api/config/validate", { path: $("#config-path").value, values: allValues() })); }
    catch (e) { setStatus($("#config-status"), e.message, "bad"); }
  }, 250);
}
async function loadConfig(path) {
  const data = await api("GET", "/api/config?path=" + encodeURIComponent(path));
  state.config = path; $("#config-path").value = path;
  fillForm(data.values); scheduleValidate();
}
async function saveConfig() {
  const path = $("#config-path").value.trim();
  const result = await api("PUT", "/api/config", { path, values: allValues() });
  showErrors(result);
  state.config = result.saved;
  await refreshConfigList(result.saved);
  setStatus($("#config-status"), "saved " + result.saved + (result.ok ? "" : " (with problems)"), result.ok ? "good" : "bad");
  return result;
}
async function refreshConfigList(selected) {
  const info = await api("GET", "/api/info");
  $("#workspace").textContent = "workspace: " + info.workspace;
  const sel = $("#config-select"); sel.innerHTML = "";
  for (const c of info.configs) sel.append(el("option", { value: c, textContent: c }));
  sel.value = selected || info.default_config || info.configs[0] || "";
  return info;
}
$("#config-select").addEventListener("change", (e) => loadConfig(e.target.value));
$("#save-config").addEventListener("click", () => saveConfig().catch((e) => setStatus($("#config-status"), e.message, "bad")));
$("#start-job").addEventListener("click", async () => {
  try {
    const saved = await saveConfig();
    if (!saved.ok) return;
    const job = await api("POST", "/api/jobs", { config: saved.saved });
    state.jobId = job.id; showTab("jobs");
  } catch (e) { setStatus($("#config-status"), e.message, "bad"); }
});

// --- dataset ------------------------------------------------------------------------------------------------
async function loadDataset() {
  const status = $("#dataset-status");
  $("#dataset-config").textContent = state.config || "(no config)";
  if (!state.config) return;
  try {
    const data = await api("GET", "/api/dataset?config=" + encodeURIComponent(state.config));
    state.dataDir = data.data_dir;
    $("#dataset-captions").textContent = data.captions_in;
    const grid = $("#thumbs"); grid.innerHTML = "";
    for (const item of data.images) {
      const text = el("textarea", { rows: 3, value: item.caption });
      const saved = el("span", { className: "status" });
      text.addEventListener("change", async () => {
        try {
          await api("PUT", "/api/caption", { config: state.config, image: item.path, caption: text.value });
          setStatus(saved, "saved ✓", "good");
        } catch (e) { setStatus(saved, e.message, "bad"); }
      });
      grid.append(el("div", { className: "thumb" }, [el("img", { src: fileUrl(item.path), alt: item.path }),
        el("div", { className: "name", textContent: item.path.split("/").pop() }), el("div", {}, [text]), saved]));
    }
    const refused = data.refused || [];
    setStatus(status, data.images.length + " images" + (refused.length ? ` · ${refused.length} left out: ` +
      refused.map((r) => `${r.path} (${r.reason})`).join("; ") : ""), refused.length ? "bad" : "");
  } catch (e) { setStatus(status, e.message, "bad"); }
}
$("#run-label").addEventListener("click", async () => {
  setStatus($("#dataset-status"), "captioning…");
  try {
    const backend = $("#label-backend").value;
    const r = await api("POST", "/api/label", { config: state.config, trigger: $("#label-trigger").value,
      overwrite: $("#label-overwrite").checked, backend, model: backend === "basic" ? null : $("#label-model").value });
    await loadDataset();
    setStatus($("#dataset-status"), `${r.written} new captions, ${r.kept} kept` + (r.failed.length ? `, ${r.failed.length} unreadable` : ""), "good");
  } catch (e) { setStatus($("#dataset-status"), e.message, "bad"); }
});
$("#label-backend").addEventListener("change", (e) => { $("#label-model-box").hidden = e.target.value === "basic"; });
$("#run-check").addEventListener("click", async () => {
  setStatus($("#dataset-status"), "checking…");
  const box = $("#check-report");
  try {
    const vram = parseFloat($("#check-vram").value);
    const r = await api("POST", "/api/check", { config: state.config, trigger: $("#label-trigger").value || null,
      vram_gb: Number.isFinite(vram) ? vram : null });
    box.textContent = r.text; box.hidden = false;
    setStatus($("#dataset-status"), r.ok ? "check passed" : "check found errors", r.ok ? "good" : "bad");
  } catch (e) { box.textContent = e.message; box.hidden = false; setStatus($("#dataset-status"), "check failed", "bad"); }
});
$("#upload").addEventListener("change", async (e) => {
  const form = new FormData();
  for (const f of e.target.files) form.append("files", f);
  try {
    const r = await api("POST", "/api/upload?folder=" + encodeURIComponent(state.dataDir), form);
    await loadDataset();
    setStatus($("#dataset-status"), `added ${r.saved.length} images` + (r.notes && r.notes.length ? " · " + r.notes.join("; ") : ""), "good");
  } catch (err) { setStatus($("#dataset-status"), err.message, "bad"); }
  e.target.value = "";
});

// --- jobs ---------------------------------------------------------------------------------------------------
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s); return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
function progressText(job) {
  const p = job.progress;
  if (job.status === "done") return "100 % · done";
  if (!p) return job.status;
  if (p.phase !== "training") return p.phase + "…";
  if (p.step >= p.total && job.status === "running") return "100 % · saving the LoRA and testing that it loads…";
  const pct = Math.floor((100 * p.step) / p.total);
  return `${pct} % · step ${p.step}/${p.total} · loss ${p.loss === null ? "nan" : p.loss.toFixed(4)} · ` +
    `${p.steps_per_second.toFixed(2)} it/s · ETA ${fmtSeconds(p.eta_seconds)}`;
}
function percent(job) {
  if (job.status === "done") return 100;
  const p = job.progress; return p && p.phase === "training" ? (100 * p.step) / p.total : 0;
}
async function refreshJobs() {
  const jobs = await api("GET", "/api/jobs");
  const list = $("#job-list"); list.innerHTML = "";
  const table = el("table", {}, [el("thead", {}, [el("tr", {}, ["", "Job", "Config", "Status", "Progress", ""].map((h) => el("th", { textContent: h })))])]);
  state.compare = state.compare || new Set();
  const body = el("tbody");
  for (const job of jobs) {
    const actions = el("td");
    if (job.status === "running" || job.status === "queued") actions.append(el("button", { textContent: "Stop", onclick: () => api("POST", `/api/jobs/${job.id}/stop`).then(refreshJobs) }));
    if (["stopped", "interrupted", "failed"].includes(job.status)) actions.append(el("button", { textContent: "Resume", onclick: () => api("POST", `/api/jobs/${job.id}/resume`).then(refreshJobs) }));
    const bar = el("div", { className: "progress mini" }, [el("div", { style: `width:${percent(job)}%` })]);
    const tick = el("input", { type: "checkbox", disabled: job.status !== "done", checked: state.compare.has(job.id),
      className: "compare-tick", onchange: (e) => { e.target.checked ? state.compare.add(job.id) : state.compare.delete(job.id); } });
    const row = el("tr", { className: job.id === state.jobId ? "selected" : "", id: "job-row-" + job.id }, [
      el("td", {}, [tick]), el("td", { textContent: "#" + job.id }), el("td", { textContent: job.config }),
      el("td", {}, [el("span", { className: "badge " + job.status, textContent: job.status })]),
      el("td", {}, [bar, " ", progressText(job)]), actions]);
    row.addEventListener("click", (ev) => { if (!["BUTTON", "INPUT"].includes(ev.target.tagName)) { state.jobId = job.id; refreshJobs(); } });
    body.append(row);
  }
  table.append(body); list.append(jobs.length ? table : el("p", { className: "muted", textContent: "No jobs yet: start one from the Config page." }));
  if (state.jobId === null && jobs.length) state.jobId = jobs[0].id;
  if (state.jobId !== null) await showJob(state.jobId);
  clearTimeout(state.pollTimer);
  if ($("#tab-jobs").classList.contains("active")) state.pollTimer = setTimeout(() => refreshJobs().catch(() => {}), 1000);
}
async function showJob(id) {
  const job = await api("GET", "/api/jobs/" + id);
  $("#job-detail").hidden = false;
  $("#job-title").textContent = `Job #${job.id} · ${job.config} · ${job.status}`;
  $("#job-bar").style.width = percent(job) + "%";
  $("#job-progress-text").textContent = progressText(job);
  const err = $("#job-error"); err.hidden = !job.error; err.textContent = job.error || "";
  $("#job-log").textContent = job.log;
  const curves = await api("GET", `/api/jobs/${id}/curves`);
  drawChart(curves);
  const samples = $("#job-samples");
  const wanted = curves.samples.join("|");
  if (samples.dataset.shown !== wanted) {
    samples.dataset.shown = wanted; samples.innerHTML = "";
    for (const s of curves.samples) samples.append(el("img", { src: fileUrl(s), title: s }));
    if (!curves.samples.length) samples.append(el("span", { className: "muted", textContent: "none yet (set sample_prompts and sample_every_n_steps)" }));
  }
}
function drawChart(c) {
  const svg = $("#loss-chart"), W = 600, H = 260, P = 40;
  svg.innerHTML = "";
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs) => { const n = document.createElementNS(ns, tag); for (const k in attrs) n.setAttribute(k, attrs[k]); svg.append(n); return n; };
  add("rect", { x: 0, y: 0, width: W, height: H, fill: "#fff" });
  if (!c.steps.length) { add("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#888" }).textContent = "waiting for the first step…"; return; }
  const vals = c.loss.concat(c.validation.map((v) => v[1])).filter(Number.isFinite);
  const lo = Math.min(...vals), hi = Math.max(...vals), maxStep = Math.max(...c.steps, 1);
  const x = (s) => P + ((W - 2 * P) * s) / maxStep, y = (v) => H - P - ((H - 2 * P) * (v - lo)) / (hi - lo || 1);
  add("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#999" });
  add("line", { x1: P, y1: P, x2: P, y2: H - P, stroke: "#999" });
  for (const [v, yy] of [[hi, P], [lo, H - P]]) add("text", { x: 4, y: yy + 4, "font-size": 10, fill: "#555" }).textContent = v.toFixed(3);
  add("text", { x: W - P, y: H - P + 16, "text-anchor": "end", "font-size": 10, fill: "#555" }).textContent = "step " + maxStep;
  const pts = c.steps.map((s, i) => `${x(s).toFixed(1)},${y(c.loss[i]).toFixed(1)}`).join(" ");
  add("polyline", { points: pts, fill: "none", stroke: "#93c5fd", "stroke-width": 1, id: "loss-raw" });
  let ema = c.loss[0]; const smooth = c.loss.map((v) => (ema = 0.9 * ema + 0.1 * v));
  add("polyline", { points: c.steps.map((s, i) => `${x(s).toFixed(1)},${y(smooth[i]).toFixed(1)}`).join(" "), fill: "none", stroke: "#1d4ed8", "stroke-width": 2 });
  for (const [s, v] of c.validation) add("circle", { cx: x(s), cy: y(v), r: 3.5, fill: "#f97316" });
}

$("#compare-run").addEventListener("click", async () => {
  const status = $("#compare-status");
  if (state.compare.size < 1) return setStatus(status, "tick at least one finished job", "bad");
  setStatus(status, "drawing…");
  try {
    const r = await api("POST", "/api/compare", { jobs: [...state.compare], prompt: $("#compare-prompt").value,
      weight: parseFloat($("#compare-weight").value) || 1 });
    const out = $("#compare-out"); out.innerHTML = "";
    out.append(el("img", { src: fileUrl(r.sheet), className: "sheet" }), el("img", { src: fileUrl(r.losses), className: "sheet" }));
    setStatus(status, r.rows.map((row) => `${row.run}: rank ${row.rank}, ${row.steps} steps, final loss ${row["final loss"]}`).join(" · "), "good");
  } catch (e) { setStatus(status, e.message, "bad"); }
});

// --- library ------------------------------------------------------------------------------------------------
async function loadLibrary() {
  const [loras, models] = await Promise.all([api("GET", "/api/loras"), api("GET", "/api/models")]);
  const body = $("#lora-table tbody"); body.innerHTML = "";
  for (const l of loras) {
    if (l.refused) {  // a link leading out of the workspace: named, never loaded
      body.append(el("tr", {}, [el("td", {}, [el("b", { textContent: l.name }), el("div", { className: "muted", textContent: l.path })]),
        el("td", { colSpan: 6, className: "errors", textContent: l.refused })]));
      continue;
    }
    const rank = Object.keys(l.ranks).join("/");
    body.append(el("tr", { id: "lora-" + l.name }, [
      el("td", {}, [el("b", { textContent: l.name }), el("div", { className: "muted", textContent: l.path })]),
      el("td", { textContent: (l.size_bytes / 2 ** 20).toFixed(2) + " MB" }), el("td", { textContent: l.family }),
      el("td", { textContent: rank }), el("td", { textContent: l.trigger_words.slice(0, 5).join(", ") }),
      el("td", { className: l.warnings.length ? "errors" : "muted", textContent: l.warnings.join("; ") || "loads in A1111/ComfyUI/diffusers" }),
      el("td", {}, [el("button", { textContent: "Try it", onclick: () => tryLora(l) }), " ",
        el("button", { textContent: "Verify", title: "load it as A1111/ComfyUI and diffusers do, against the base model chosen below", onclick: () => loraTool(l, { action: "verify" }) }), " ",
        el("button", { textContent: "→ diffusers", title: "write NAME_diffusers.safetensors beside it", onclick: () => loraTool(l, { action: "convert", to: "diffusers" }) }), " ",
        el("button", { textContent: "Resize", title: "write a smaller-rank copy (SVD)", onclick: () => {
          const rank = parseInt(prompt("New rank (smaller than the current one):", "4"), 10);
          if (rank > 0) loraTool(l, { action: "resize", rank });
        } })])]));
  }
  if (!loras.length) body.append(el("tr", {}, [el("td", { colSpan: 7, className: "muted", textContent: "No LoRAs yet: train one first." })]));
  const sel = $("#gen-base"), keep = sel.value; sel.innerHTML = "";
  for (const m of models) sel.append(el("option", { value: m, textContent: m }));
  if (keep) sel.value = keep;
}
async function loraTool(l, body) {
  const out = $("#tool-out"); out.hidden = false; out.className = "report"; out.textContent = `${body.action} ${l.path}…`;
  try {
    const r = await api("POST", "/api/loras/tool", { lora: l.path, base_model: $("#gen-base").value || null, ...baseFiles(), ...body });
    out.textContent = r.text + (r.problems && r.problems.length ? "\n" + r.problems.join("\n") : "");
    out.classList.add(r.ok ? "good" : "bad");
    if (r.written) loadLibrary();
  } catch (e) { out.textContent = e.message; out.classList.add("bad"); }
}
function tryLora(l) {
  const w = $("#gen-strength").value;
  const words = l.trigger_words.length ? l.trigger_words.slice(0, 3).join(", ") + ", " : "";
  $("#gen-prompt").value = `${words}<lora:${l.name}:${w}>`;
}
$("#gen-strength").addEventListener("input", (e) => {
  $("#gen-strength-value").textContent = e.target.value;
  $("#gen-prompt").value = $("#gen-prompt").value.replace(/<lora:([^:>]+)(:[^>]*)?>/, `<lora:$1:${e.target.value}>`);
});
// A Flux base's other files, where the user named them (the server looks beside the base for the rest).
function baseFiles() {
  const v = (id) => $(id).value.trim() || null;
  return { clip_l: v("#gen-clip-l"), t5xxl: v("#gen-t5xxl"), ae: v("#gen-ae"), tokenizer_dir: v("#gen-tokenizer-dir") };
}
// The ControlNet unit and IP-Adapter of the "Layout and look" box, where filled in.
function guides() {
  const v = (id) => $(id).value.trim();
  const control = v("#gen-cn-model") || v("#gen-cn-image")
    ? [{ type: $("#gen-cn-type").value, model: v("#gen-cn-model"), image: v("#gen-cn-image"), weight: +$("#gen-cn-weight").value }] : [];
  return { control, ip_adapter: v("#gen-ip-model") || null, ip_image: v("#gen-ip-image") || null, ip_scale: +$("#gen-ip-scale").value };
}
const numberOrNull = (id) => ($(id).value.trim() === "" ? null : +$(id).value);
async function runGenerate(sweep) {
  setStatus($("#gen-status"), sweep ? "drawing the sweep…" : "drawing…");
  const t0 = performance.now();
  try {
    const r = await api("POST", "/api/generate", { base_model: $("#gen-base").value, prompt: $("#gen-prompt").value,
      negative: $("#gen-negative").value, seed: +$("#gen-seed").value, steps: numberOrNull("#gen-steps"), cfg: numberOrNull("#gen-cfg"),
      size: $("#gen-size").value.trim() || null,
      prediction_type: $("#gen-prediction").value, strengths: sweep ? [0, 0.25, 0.5, 0.75, 1] : null, ...baseFiles(), ...guides() });
    $("#gen-out").prepend(el("img", { src: fileUrl(r.image), title: r.image, className: "generated" }));
    setStatus($("#gen-status"), `done in ${((performance.now() - t0) / 1000).toFixed(1)} s: ${r.image}`, "good");
  } catch (e) { setStatus($("#gen-status"), e.message, "bad"); }
}
$("#gen-run").addEventListener("click", () => runGenerate(false));
$("#gen-sweep").addEventListener("click", () => runGenerate(true));

// --- start --------------------------------------------------------------------------------------------------
(async function init() {
  state.schema = await api("GET", "/api/schema");
  buildForm();
  const info = await refreshConfigList();
  if (info.default_config) await loadConfig(info.default_config);
  document.body.dataset.ready = "1";
})();
