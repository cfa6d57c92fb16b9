// Bulwark's dashboard: plain JavaScript over the REST API (no build step, nothing fetched
// from anywhere but this server). The API key stays in sessionStorage (this tab only).
"use strict";
const $ = (id) => document.getElementById(id);
let KEY = sessionStorage.getItem("bulwark-key");
const streams = new Map();      // job id -> AbortController of its event stream
const figures = new Map();      // job id -> headline figures from its report
const MAX_STREAMS = 4;

async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {...(opts.headers || {}),
    "Authorization": `Bearer ${KEY}`}});
  if (r.status === 401) { signOut("the key was refused"); throw new Error("401"); }
  return r;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text ?? "–";
  if (cls) td.className = cls;
  return td;
}
const pct = (x) => (x === null || x === undefined) ? "–" : x.toFixed(3);

function headline(report) {
  const attacks = report.final.attacks || {};
  const pick = (p) => Object.entries(attacks).find(([k]) => k.startsWith(p));
  const pgd = pick("pgd"), aa = pick("autoattack");
  const cert = report.certification;
  const i = cert ? Math.min(2, cert.radii.length - 1) : 0;
  return {clean: report.final.clean_acc, pgd: pgd && pgd[1].acc, aa: aa && aa[1].acc,
          cert: cert ? cert.certified_accuracy[i] : null,
          // a certified figure means nothing without its radius and σ
          certAt: cert ? `r = ${cert.radii[i]}, σ = ${cert.sigma}` : ""};
}

function progressText(job) {
  const p = job.progress || {};
  if (job.state === "queued") return "queued";
  if (job.state !== "running") return job.error ? job.error.slice(0, 60) : "";
  const parts = [];
  if (p.epoch) parts.push(`epoch ${p.epoch}/${p.epochs ?? "?"}`);
  if (p.phase) parts.push(p.phase);
  if (p.monitor && p.monitor.pgd_acc !== undefined) parts.push(`PGD ${pct(p.monitor.pgd_acc)}`);
  return parts.join(" · ") || "running";
}

async function follow(jobId) {   // live progress from the job's SSE stream
  if (streams.has(jobId) || streams.size >= MAX_STREAMS) return;
  const ctl = new AbortController();
  streams.set(jobId, ctl);
  try {
    const r = await api(`/v1/jobs/${jobId}/events`, {signal: ctl.signal});
    if (!r.ok) return;
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, at); buf = buf.slice(at + 2);
        let type = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) type = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        const row = document.querySelector(`tr[data-job="${jobId}"] td.progress`);
        if (row && type === "epoch") {
          const d = JSON.parse(data);
          row.textContent = `epoch ${d.epoch} · PGD ${pct(d.monitor && d.monitor.pgd_acc)}`;
        } else if (row && type === "phase") {
          row.textContent = JSON.parse(data).phase;
        }
        if (["succeeded", "failed", "cancelled"].includes(type)) { refresh(); return; }
      }
    }
  } catch (e) { /* aborted, or the stream dropped: the next refresh reopens it */ }
  finally { streams.delete(jobId); }
}

async function openReport(job) {
  const r = await api(`/v1/jobs/${job.id}/artifacts/report.html`);
  if (!r.ok) return;
  const url = URL.createObjectURL(await r.blob());
  $("viewer-title").textContent = `Report: ${job.name || job.id.slice(0, 8)}`;
  $("viewer-frame").src = url;
  $("viewer").hidden = false;
}

async function compareSelected() {
  const ids = [...document.querySelectorAll("input.pick:checked")].map((b) => b.value);
  const r = await api(`/v1/compare?jobs=${ids.join(",")}`);
  if (!r.ok) { $("submit-result").textContent = (await r.json()).detail; return; }
  $("viewer-title").textContent = `Comparison of ${ids.length} jobs`;
  $("viewer-frame").src = URL.createObjectURL(await r.blob());
  $("viewer").hidden = false;
}

function actionButton(label, fn) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", fn);
  return b;
}

async function refresh() {
  const r = await api("/v1/jobs?limit=100");
  const {items} = await r.json();
  const tbody = $("jobs").querySelector("tbody");
  for (const job of items) {  // every await first: a tick made meanwhile must not be lost
    if (job.state === "succeeded" && !figures.has(job.id)) {
      const rep = await api(`/v1/jobs/${job.id}/report`);
      if (rep.ok) figures.set(job.id, headline(await rep.json()));
    }
  }
  const picked = new Set([...document.querySelectorAll("input.pick:checked")].map((b) => b.value));
  tbody.replaceChildren();
  for (const job of items) {
    const f = figures.get(job.id) || {};
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    const box = document.createElement("input");
    Object.assign(box, {type: "checkbox", className: "pick", value: job.id,
                        checked: picked.has(job.id), disabled: job.state !== "succeeded"});
    box.addEventListener("change", updateCompare);
    const td0 = document.createElement("td"); td0.append(box);
    const verdict = (job.verdict || {}).label || "";
    const badge = cell(verdict.replaceAll("_", " "), `verdict verdict-${verdict || "none"}`);
    if (job.verdict) badge.title = job.verdict.reason;
    tr.append(td0, cell(job.id.slice(0, 8)), cell(job.name),
              cell(job.state, `state-${job.state}`), badge, cell(progressText(job), "progress"),
              cell(pct(f.clean), "num"), cell(pct(f.pgd), "num"), cell(pct(f.aa), "num"),
              cell(f.cert === null || f.cert === undefined ? "–"
                   : `${pct(f.cert)} (${f.certAt})`, "num"));
    const acts = document.createElement("td");
    if (job.state === "succeeded") acts.append(actionButton("report", () => openReport(job)));
    if (job.state === "queued" || job.state === "running")
      acts.append(actionButton("cancel", async () => {
        await api(`/v1/jobs/${job.id}/cancel`, {method: "POST"}); refresh(); }));
    else acts.append(actionButton("delete", async () => {
        await api(`/v1/jobs/${job.id}`, {method: "DELETE"}); refresh(); }));
    tr.append(acts);
    tbody.append(tr);
    if (job.state === "running") follow(job.id);
  }
  updateCompare();
  const sw = await (await api("/v1/sweeps?limit=20")).json();
  const sbody = $("sweeps").querySelector("tbody");
  sbody.replaceChildren(...sw.items.map((s) => {
    const tr = document.createElement("tr");
    const counts = Object.entries(s.counts).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`);
    tr.append(cell(s.id.slice(0, 8)), cell(s.name), cell(s.state, `state-${s.state}`),
              cell(counts.join(", ")));
    return tr;
  }));
  await refreshBoard();
}

const NORM = {linf: "ℓ∞", l2: "ℓ2"};
const FIGURE = {autoattack: "an AutoAttack", pgd: "a PGD", certified: "a certified"};

async function refreshBoard() {   // one table, a heading row per threat: never one ranking
  const metric = $("board-metric").value;
  const r = await api(`/v1/leaderboard?metric=${metric}&limit=100`);
  if (!r.ok) return;
  const board = await r.json();
  const body = $("board").querySelector("tbody"), out = [];
  let threat = null;
  for (const row of board.items) {
    const t = `${row.dataset} · ${NORM[row.norm] || row.norm} ε = ${+row.epsilon.toPrecision(4)}`;
    if (t !== threat) {
      threat = t;
      const tr = document.createElement("tr"), th = document.createElement("th");
      Object.assign(th, {colSpan: 10, className: "threat", textContent: t});
      tr.append(th); out.push(tr);
    }
    const tr = document.createElement("tr");
    tr.className = row.rank === null ? "apart" : "ranked";
    const what = row.radius === null || row.radius === undefined ? row.metric
      : `certified r = ${row.radius}, σ = ${row.sigma}`;
    const suite = cell(row.suite + (row.standard ? "" : " *"));
    if (!row.standard) suite.title = "short of AutoAttack standard on the whole test set";
    tr.append(cell(row.rank === null ? "–" : String(row.rank), "num"), cell(row.job_id.slice(0, 8)),
              cell(row.name), cell(row.method), cell(what), cell(pct(row.robust_acc), "num"),
              cell(pct(row.clean_acc), "num"), cell(String(row.n), "num"), suite,
              cell((row.verdict || "").replaceAll("_", " "), `verdict verdict-${row.verdict}`));
    out.push(tr);
  }
  body.replaceChildren(...out);
  $("board-note").textContent = board.items.length ? (board.skipped
    ? `${board.skipped} finished jobs have no ${FIGURE[metric]} figure` : "")
    : `no finished job has ${FIGURE[metric]} figure yet`;
}

function updateCompare() {
  $("compare").disabled = document.querySelectorAll("input.pick:checked").length < 2;
}

async function submit(body) {
  const r = await api("/v1/jobs", {method: "POST", body: JSON.stringify(body),
                                   headers: {"Content-Type": "application/json"}});
  const out = await r.json();
  if (!r.ok) { showError(out); return; }
  $("submit-result").textContent = `queued job ${out.id.slice(0, 8)}`;
  $("submit-result").className = "";
  refresh();
}

function signOut(why) {
  sessionStorage.removeItem("bulwark-key"); KEY = null;
  for (const c of streams.values()) c.abort();
  $("app").hidden = true; $("signin").hidden = false; $("signout").hidden = true;
  $("signin-error").textContent = why || "";
}

async function start() {
  $("signin").hidden = true; $("app").hidden = false; $("signout").hidden = false;
  const presets = await (await api("/v1/presets")).json();
  $("preset").replaceChildren(...Object.keys(presets).map((n) => {
    const o = document.createElement("option"); o.textContent = n;
    o.selected = n === "n-aaer"; return o; }));
  await refresh();
  setInterval(() => KEY && refresh(), 5000);
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  KEY = $("key").value.trim();
  const r = await fetch("/v1/jobs?limit=1", {headers: {"Authorization": `Bearer ${KEY}`}});
  if (!r.ok) { $("signin-error").textContent = "that key was refused"; KEY = null; return; }
  sessionStorage.setItem("bulwark-key", KEY);
  start();
});
$("signout").addEventListener("click", () => signOut());
$("submit-form").addEventListener("submit", (e) => {
  e.preventDefault();
  // the form's defaults are experiments/digits-smoke/form-default.yaml: a robust model
  const spec = {dataset: {name: $("dataset").value}, recipe: $("preset").value,
                threat: {epsilon: $("epsilon").value}};
  if ($("epochs").value) spec.schedule = {epochs: +$("epochs").value};
  if ($("name").value) spec.name = $("name").value;
  submit(spec);
});
function showError(out) {
  $("submit-result").textContent = Array.isArray(out.detail)
    ? out.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
    : out.detail;
  $("submit-result").className = "error";
}

$("submit-json").addEventListener("click", async () => {
  // YAML or JSON: the server resolves it as it would run (presets applied), then it is sent
  const r = await api("/v1/specs/resolve", {method: "POST", body: $("spec-json").value,
                                            headers: {"Content-Type": "application/yaml"}});
  const out = await r.json();
  if (!r.ok) { showError(out); return; }
  submit(out.spec);
});
$("compare").addEventListener("click", compareSelected);
$("board-metric").addEventListener("change", refreshBoard);
$("viewer-close").addEventListener("click", () => { $("viewer").hidden = true; });
if (KEY) start();
