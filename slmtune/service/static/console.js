// slmtune console: a few views over the service's /v1 API, called with the signed-in API key
// (kept in sessionStorage only) exactly as the openai client calls it. No build step, no libraries.
"use strict";

const KEY = "slmtune.apiKey";
const TERMINAL = ["succeeded", "failed", "cancelled"];
let timers = [];          // polling timers of the current view, cleared on navigation
let viewToken = 0;        // bumps on navigation so late answers of an old view are dropped

// --- helpers -----------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function field(id, label, control, hint) {
  control.id = id;
  const kids = [h("label", { for: id, text: label }), control];
  if (hint) {
    const hid = id + "-hint";
    control.setAttribute("aria-describedby", hid);
    kids.push(h("span", { class: "hint", id: hid }, hint));
  }
  return h("div", { class: "field" }, kids);
}

function key() { return sessionStorage.getItem(KEY); }

class ApiFailure extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status; this.code = err.code; this.param = err.param;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + key() }, options.headers || {});
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options = Object.assign({}, options, { body: JSON.stringify(options.json) });
  }
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (options.raw) {
    if (!resp.ok) throw new ApiFailure(resp.status, await resp.json().catch(() => null));
    return resp;
  }
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    if (resp.status === 401 && location.hash !== "#/signin") { signOut("Your API key was refused; sign in again."); }
    throw new ApiFailure(resp.status, body);
  }
  return body;
}

// A form's submit button is disabled while its request is in flight: a double click sends one request.
async function busyWhile(button, fn) {
  if (button.disabled) return;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try { return await fn(); }
  finally { button.disabled = false; button.removeAttribute("aria-busy"); }
}

async function listAll(path) {   // follows has_more / after through every page
  let out = [], after = null;
  for (let i = 0; i < 50; i++) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(path + (after ? `${sep}after=${encodeURIComponent(after)}` : ""));
    out = out.concat(page.data);
    if (!page.has_more || !page.data.length) break;
    after = page.last_id;
  }
  return out;
}

function when(ts) { return ts ? new Date(ts * 1000).toLocaleString() : "—"; }
function gb(bytes) { return bytes < 1024 ** 3 / 10 ? (bytes / 1024 ** 2).toFixed(1) + " MB" : (bytes / 1024 ** 3).toFixed(2) + " GB"; }
function statusBadge(s) { return h("span", { class: "status " + s, text: s.replace("_", " ") }); }
function errorBox(message, id) { return h("div", { class: "error", role: "alert", id }, message); }

function setMain(title, ...children) {
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", { tabindex: "-1", id: "page-title" }, title), ...children.filter(c => c !== null && c !== undefined));
  document.title = title + " · slmtune console";
  return main;
}

function every(ms, fn) { const t = setInterval(fn, ms); timers.push(t); return t; }

// --- routing -----------------------------------------------------------------------------------
const routes = [
  [/^#\/signin$/, viewSignIn],
  [/^#\/files$/, viewFiles],
  [/^#\/new$/, viewNewJob],
  [/^#\/jobs$/, viewJobs],
  [/^#\/jobs\/([^/]+)$/, viewJob],
  [/^#\/playground$/, viewPlayground],
];

function route() {
  timers.forEach(clearInterval); timers = []; viewToken++;
  const hash = location.hash || "#/files";
  if (!key() && hash !== "#/signin") { location.hash = "#/signin"; return; }
  document.getElementById("nav").hidden = !key();
  for (const a of document.querySelectorAll("#nav a")) {
    if (hash.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [re, view] of routes) {
    const m = hash.match(re);
    if (m) {
      Promise.resolve(view(...m.slice(1).map(decodeURIComponent))).catch(err => {
        setMain("Something went wrong", errorBox(err.message));
      }).finally(() => {
        const title = document.getElementById("page-title");
        if (title && document.activeElement === document.body) title.focus();
      });
      return;
    }
  }
  setMain("Page not found", h("p", {}, "No such page. ", h("a", { href: "#/files" }, "Go to files")));
}

function signOut(message) {
  sessionStorage.removeItem(KEY);
  sessionStorage.setItem("slmtune.signinMessage", message || "");
  if (location.hash === "#/signin") route();
  else location.hash = "#/signin";
}

// --- sign in -----------------------------------------------------------------------------------
function viewSignIn() {
  const input = h("input", { type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const msg = h("div", { id: "signin-result", "aria-live": "polite" });
  const note = sessionStorage.getItem("slmtune.signinMessage");
  sessionStorage.removeItem("slmtune.signinMessage");
  if (note) msg.append(errorBox(note));
  const form = h("form", { class: "card", id: "signin-form" },
    field("api-key", "API key", input, "From whoever runs this service (slmtune keys create --tenant NAME). Kept in this tab's session storage only."),
    h("button", { type: "submit" }, "Sign in"), msg);
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    msg.replaceChildren();
    const candidate = input.value.trim();
    const resp = await fetch("/v1/models", { headers: { Authorization: "Bearer " + candidate } });
    if (!resp.ok) {
      // The API's own message speaks to programs (headers); a person gets a sentence.
      const body = await resp.json().catch(() => null);
      msg.replaceChildren(errorBox(resp.status === 401 ? "This API key was not accepted. Check that you copied all " +
        "of it, or ask whoever runs the service for a new one." :
        (body && body.error && body.error.message) || `HTTP ${resp.status}`, "signin-error"));
      return;
    }
    sessionStorage.setItem(KEY, candidate);
    location.hash = "#/files";
  });
  setMain("Sign in", form);
  input.focus();
}

// --- files -------------------------------------------------------------------------------------
function uploadErrors(message) {
  // "Invalid file format for fine-tuning: line 13: invalid_json: ...; line 14: ..." -> one item per problem
  const m = message.match(/^([^:]*?):\s+(line \d+:[\s\S]*)$/);
  if (!m) return errorBox(message, "upload-error");
  const items = m[2].split(/;\s+(?=line \d+:|\(and \d+ more\))/);
  return h("div", { class: "error", role: "alert", id: "upload-error" },
    h("strong", {}, m[1] + ":"), h("ul", {}, items.map(t => h("li", {}, t))));
}

async function viewFiles() {
  const token = viewToken;
  const input = h("input", { type: "file", accept: ".jsonl,.json,application/jsonl,application/json", required: true });
  const result = h("div", { id: "upload-result", "aria-live": "polite" });
  const form = h("form", { class: "card", id: "upload-form" },
    field("upload-file", "JSONL file to upload", input,
      "Chat, prompt/completion or text lines; the server validates every line and names the bad ones."),
    h("button", { type: "submit", id: "upload-button" }, "Upload"), result);
  const list = h("div", { id: "file-list" });
  form.addEventListener("submit", ev => { ev.preventDefault(); busyWhile(form.querySelector("#upload-button"), upload); });
  async function upload() {
    if (!input.files.length) return;
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", input.files[0]);
    result.replaceChildren(h("p", { class: "hint" }, "Uploading and validating…"));
    try {
      const f = await api("/v1/files", { method: "POST", body });
      result.replaceChildren(h("div", { class: "ok", role: "status", id: "upload-ok" },
        `Uploaded ${f.filename} as `, h("code", {}, f.id), ` (${f.bytes} bytes): valid.`));
      form.reset();
      refresh();
    } catch (err) {
      result.replaceChildren(uploadErrors(err.message));
    }
  }

  async function refresh() {
    const files = await listAll("/v1/files?limit=100");
    if (token !== viewToken) return;
    if (!files.length) { list.replaceChildren(h("p", {}, "No files yet.")); return; }
    list.replaceChildren(h("table", {},
      h("caption", { class: "hint" }, `${files.length} file(s)`),
      h("thead", {}, h("tr", {}, ["File", "ID", "Bytes", "Uploaded", "Actions"].map(t => h("th", { scope: "col", text: t })))),
      h("tbody", {}, files.map(f => h("tr", { "data-file-id": f.id },
        h("td", {}, f.filename), h("td", {}, h("code", {}, f.id)), h("td", { class: "num" }, f.bytes),
        h("td", {}, when(f.created_at)),
        h("td", {}, h("div", { class: "buttons" },
          h("button", { type: "button", class: "secondary", "aria-label": `Download ${f.filename}`,
                        onclick: () => download(f) }, "Download"),
          h("button", { type: "button", class: "danger", "aria-label": `Delete ${f.filename}`,
                        onclick: () => remove(f) }, "Delete"))))))));
  }

  async function download(f) {
    const resp = await api(`/v1/files/${encodeURIComponent(f.id)}/content`, { raw: true });
    const url = URL.createObjectURL(await resp.blob());
    const a = h("a", { href: url, download: f.filename });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  async function remove(f) {
    if (!confirm(`Delete ${f.filename} (${f.id})?`)) return;
    try { await api(`/v1/files/${encodeURIComponent(f.id)}`, { method: "DELETE" }); }
    catch (err) { result.replaceChildren(errorBox(err.message)); }
    refresh();
  }

  setMain("Files", form, h("h2", {}, "Your files"), list);
  await refresh();
}

// --- new job -----------------------------------------------------------------------------------
async function viewNewJob() {
  const token = viewToken;
  const [models, allFiles] = await Promise.all([api("/v1/models"), listAll("/v1/files?limit=100")]);
  const files = allFiles.filter(f => f.purpose === "fine-tune");   // not the jobs' result files
  if (token !== viewToken) return;
  const bases = models.data.filter(m => !m.parent);
  const fileOption = f => h("option", { value: f.id }, `${f.filename} (${f.id})`);
  const base = h("select", { required: true }, bases.map(m => h("option", { value: m.id }, m.id)));
  const train = h("select", { required: true }, files.map(fileOption));
  const valid = h("select", {}, h("option", { value: "" }, "(none)"), files.map(fileOption));
  const method = h("select", {}, ["lora", "qlora", "dora", "full"].map(m => h("option", { value: m }, m)));
  // Each file format trains with one objective; "auto" hyperparameters below pick it for the chosen file.
  const methodType = h("select", {}, [["supervised", "Supervised (chat examples)"], ["dpo", "DPO (preference pairs)"],
    ["reinforcement", "Reinforcement (prompts and a grader)"]].map(([v, label]) => h("option", { value: v }, label)));
  const hp = {}, hpField = {};
  const hpNames = { n_epochs: "Epochs", batch_size: "Batch size", learning_rate_multiplier: "Learning rate multiplier",
                    beta: "DPO beta", eval_interval: "Evaluation interval (steps)", eval_samples: "Evaluation samples",
                    compute_multiplier: "Compute multiplier" };
  // OpenAI's method.<type>.hyperparameters; reinforcement's reasoning_effort is left to the server ("auto").
  const common = ["n_epochs", "batch_size", "learning_rate_multiplier"];
  const hpOf = { supervised: common, dpo: [...common, "beta"],
                 reinforcement: [...common, "eval_interval", "eval_samples", "compute_multiplier"] };
  const hpFields = Object.entries(hpNames).map(([name, label]) => {
    hp[name] = h("input", { type: "text", value: "auto", inputmode: "decimal" });
    return hpField[name] = field("hp-" + name, label, hp[name], "auto");
  });
  const typeNames = () => hpOf[methodType.value] || common;

  // A reinforcement job's grader: OpenAI's grader object, checked by the server before the job is created.
  const exampleGrader = { type: "string_check", name: "exact", input: "{{sample.output_text}}",
                          reference: "{{item.answer}}", operation: "eq" };
  const graderText = h("textarea", { rows: "8", spellcheck: "false", autocomplete: "off", class: "code",
                                     text: JSON.stringify(exampleGrader, null, 2) });
  const graderResult = h("div", { id: "grader-result", "aria-live": "polite" });
  const checkButton = h("button", { type: "button", class: "secondary", id: "check-grader" }, "Check grader");
  const graderBox = h("fieldset", { id: "grader-box" }, h("legend", {}, "Grader (reinforcement)"),
    field("grader", "Grader (OpenAI grader JSON)", graderText,
      "Scores each sampled answer from 0 to 1 (string_check, text_similarity, python, score_model or multi): " +
      "{{sample.output_text}} is the answer, {{item.FIELD}} a field of the prompt's row."),
    h("div", { class: "buttons" }, checkButton), graderResult);
  function showTypeFields() {
    for (const name of Object.keys(hpNames)) hpField[name].hidden = !typeNames().includes(name);
    graderBox.hidden = methodType.value !== "reinforcement";
  }
  function graderJson() {   // the textarea's grader, or an Error in words
    try { return JSON.parse(graderText.value); }
    catch (err) { throw new Error(`Grader: not valid JSON (${err.message})`); }
  }
  const apiError = (err, id) => errorBox(err.message + (err.param ? ` (${err.param})` : ""), id);
  async function checkGrader() {
    graderResult.replaceChildren();
    graderText.removeAttribute("aria-invalid");
    try {
      const { grader } = await api("/v1/fine_tuning/alpha/graders/validate",
                                   { method: "POST", json: { grader: graderJson() } });
      graderResult.replaceChildren(h("div", { class: "ok", role: "status", id: "grader-ok" },
        `Grader OK: ${grader.name || "(unnamed)"} (${grader.type}) can run here.`));
    } catch (err) {
      graderText.setAttribute("aria-invalid", "true");
      graderResult.replaceChildren(apiError(err, "grader-error"));
    }
  }
  // Escaped "-": browsers compile `pattern` with the v flag, where a bare "-" in a class is an error.
  const suffix = h("input", { type: "text", maxlength: "18", pattern: "[A-Za-z0-9_\\-]{1,18}" });
  const planBox = h("div", { id: "plan", "aria-live": "polite" });
  const result = h("div", { id: "job-result", "aria-live": "polite" });
  let auto = null;

  function hpValue(name) {
    const raw = hp[name].value.trim();
    if (raw === "" || raw === "auto") return "auto";
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw;   // the server explains what is wrong with a non-number
  }

  function hintOf(name) {   // what "auto" means for the chosen file, once the server said
    if (name === "eval_interval") return '"auto": about 5 evaluations over the job';
    if (!auto || auto.auto[name] === undefined) return "auto";
    const rft = auto.method_type === "reinforcement";
    let text = `"auto" picks ${auto.auto[name]}`;
    if (name === "n_epochs") {
      text += ` for ${auto.n_examples} ${auto.method_type === "dpo" ? "pairs" : rft ? "prompts" : "examples"}`;
      if (auto.target_tokens_text) text += ` answering in ${auto.target_tokens_text} tokens`;
      if (auto.validation_file) text += " (none held out: the validation file checks)";
    }
    if (name === "batch_size" && rft) text += " prompts per step";
    if (name === "compute_multiplier") text += ": 8 answers sampled per prompt (8 × this, at most 4)";
    return text;
  }
  function showHints() {
    for (const name of Object.keys(hpNames)) hpField[name].querySelector(".hint").textContent = hintOf(name);
  }

  async function refreshAuto() {
    auto = null;
    showHints();
    const fileId = train.value, model = base.value, validId = valid.value;
    if (!fileId) return;
    // with the base model, epochs count the answers' tokens as the job will; with a validation
    // file, nothing of the training file is held out
    const query = `training_file=${encodeURIComponent(fileId)}` + (model ? `&model=${encodeURIComponent(model)}` : "") +
      (validId ? `&validation_file=${encodeURIComponent(validId)}` : "");
    let answer;
    try {
      answer = await api(`/v1/slmtune/auto_hyperparameters?${query}`);
    } catch (err) { return; }
    // another file, model (or page) was chosen meanwhile
    if (token !== viewToken || train.value !== fileId || base.value !== model || valid.value !== validId) return;
    auto = answer;
    // pairs train with DPO, prompts with reinforcement, chat examples with supervised
    methodType.value = auto.method_type;
    showTypeFields();
    showHints();
    refreshPlan();
  }

  let planRequest = 0;   // the newest plan request: an older answer arriving late is dropped
  async function refreshPlan() {
    const request = ++planRequest;   // first: a cleared box must not be refilled by an older answer
    if (!base.value) { planBox.replaceChildren(); return; }
    let batch = hpValue("batch_size");
    if (batch === "auto") batch = auto ? auto.auto.batch_size : 1;
    if (!Number.isInteger(batch) || batch < 1) { planBox.replaceChildren(); return; }
    try {
      const p = await api(`/v1/slmtune/plan?model=${encodeURIComponent(base.value)}&method=${method.value}&batch_size=${batch}`);
      if (request !== planRequest || token !== viewToken) return;
      const e = p.estimate;
      planBox.replaceChildren(h("div", { class: p.fits ? "ok" : "error", id: "plan-verdict" },
        h("strong", {}, p.fits ? "Fits: " : "Does not fit: "),
        `${p.method} on ${p.model} needs about ${gb(e.total)} of this server's ${gb(p.budget_bytes)} (${p.hardware}), ` +
        `at most: ${p.micro_batch} example(s) of the full ${p.seq_len} tokens per pass (shorter examples take less).`),
        h("table", { class: "plan-table" }, h("caption", { class: "hint" }, "Memory estimate per method (slmtune plan)"),
          h("thead", {}, h("tr", {}, ["Method", "Weights", "Gradients", "Optimizer", "Activations", "Total", "Fits"]
            .map(t => h("th", { scope: "col", text: t })))),
          h("tbody", {}, p.methods.map(r => h("tr", {},
            h("th", { scope: "row" }, r.method + (r.method === p.method ? " (chosen)" : "")),
            [r.weights, r.gradients, r.optimizer, r.activations, r.total].map(v => h("td", { class: "num" }, gb(v))),
            h("td", {}, r.fits ? "yes" : "no"))))));
    } catch (err) {
      if (request !== planRequest || token !== viewToken) return;
      planBox.replaceChildren(errorBox("No memory estimate: " + err.message));
    }
  }

  const form = h("form", { class: "card", id: "job-form" },
    h("div", { class: "row" }, field("base-model", "Base model", base), field("method", "Method", method),
      field("method-type", "Training objective", methodType)),
    h("div", { class: "row" }, field("training-file", "Training file", train),
      field("validation-file", "Validation file (optional)", valid)),
    graderBox,
    h("fieldset", {}, h("legend", {}, "Hyperparameters (\"auto\" or a number)"), h("div", { class: "row" }, hpFields)),
    field("suffix", "Suffix (optional)", suffix, "1-18 letters, digits, - or _; part of the fine-tuned model's name."),
    h("h2", {}, "Memory on this server"), planBox,
    h("div", { class: "buttons" }, h("button", { type: "submit", id: "create-job" }, "Create job")), result);
  train.addEventListener("change", refreshAuto);
  // the plan depends on the model alone: refreshed at once, and again once "auto" answers (its batch)
  base.addEventListener("change", () => { refreshPlan(); if (train.value) refreshAuto(); });
  valid.addEventListener("change", refreshAuto);
  method.addEventListener("change", refreshPlan);
  methodType.addEventListener("change", showTypeFields);
  showTypeFields();
  checkButton.addEventListener("click", () => busyWhile(checkButton, checkGrader));
  graderText.addEventListener("input", () => { graderResult.replaceChildren(); graderText.removeAttribute("aria-invalid"); });
  hp.batch_size.addEventListener("change", refreshPlan);
  form.addEventListener("submit", ev => { ev.preventDefault(); busyWhile(form.querySelector("#create-job"), createJob); });
  async function createJob() {
    result.replaceChildren();
    const type = methodType.value;
    const settings = { hyperparameters: Object.fromEntries(typeNames().map(n => [n, hpValue(n)])) };
    if (type === "reinforcement") {
      try { settings.grader = graderJson(); }
      catch (err) { result.replaceChildren(errorBox(err.message, "job-error")); return; }
    }
    const body = { model: base.value, training_file: train.value, method: { type, [type]: settings },
                   slmtune_method: method.value };
    if (valid.value) body.validation_file = valid.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = "#/jobs/" + encodeURIComponent(job.id);
    } catch (err) {
      // e.g. a grader reading {{item.answer}} of a file without it: method.reinforcement.grader
      if (err.param && err.param.startsWith("method.reinforcement.grader")) graderText.setAttribute("aria-invalid", "true");
      result.replaceChildren(apiError(err, "job-error"));
    }
  }
  const intro = files.length ? null :
    h("p", { class: "error" }, "Upload a training file first on the ", h("a", { href: "#/files" }, "Files"), " page.");
  setMain("New fine-tuning job", intro, form);
  refreshAuto();
  refreshPlan();
}

// --- jobs --------------------------------------------------------------------------------------
async function viewJobs() {
  const token = viewToken;
  const list = h("div", { id: "job-list" });
  setMain("Jobs", h("p", {}, h("a", { href: "#/new" }, "New job")), list);
  async function refresh() {
    const jobs = await listAll("/v1/fine_tuning/jobs?limit=100");
    if (token !== viewToken) return;
    if (!jobs.length) { list.replaceChildren(h("p", {}, "No jobs yet.")); return; }
    list.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Job", "Status", "Suffix", "Base", "Method", "Created", "Fine-tuned model"].map(t => h("th", { scope: "col", text: t })))),
      h("tbody", {}, jobs.map(j => h("tr", { "data-job-id": j.id },
        h("td", {}, h("a", { href: "#/jobs/" + encodeURIComponent(j.id) }, h("code", {}, j.id))),
        h("td", {}, statusBadge(j.status)), h("td", {}, j.user_provided_suffix || "—"), h("td", {}, j.model),
        h("td", {}, j.slmtune_method + (j.method && j.method.type && j.method.type !== "supervised" ? " · " + j.method.type : "")),
        h("td", {}, when(j.created_at)), h("td", {}, j.fine_tuned_model ? h("code", {}, j.fine_tuned_model) : "—"))))));
  }
  await refresh();
  every(3000, () => refresh().catch(() => {}));
}

// `span`: values the y axis always covers (a reward's 0 and 1), besides the points' own range.
function drawChart(canvas, train, valid, span = []) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, hgt = canvas.clientHeight || 280;
  canvas.width = w * ratio; canvas.height = hgt * ratio;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, hgt);
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#1a1a1a";
  const all = train.concat(valid);
  canvas.dataset.trainPoints = train.length;
  canvas.dataset.validPoints = valid.length;
  if (!all.length) { g.fillText("No loss values yet: the curve appears with the first training step.", 12, 24); return; }
  const pad = { l: 56, r: 16, t: 12, b: 34 };
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
  let y0 = Math.min(...ys, ...span), y1 = Math.max(...ys, ...span);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = y => pad.t + (1 - (y - y0) / (y1 - y0)) * (hgt - pad.t - pad.b);
  g.strokeStyle = "#c9ccd1"; g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4;
    g.beginPath(); g.moveTo(pad.l, Y(v)); g.lineTo(w - pad.r, Y(v)); g.stroke();
    g.fillText(v.toFixed(3), pad.l - 6, Y(v));
  }
  g.textAlign = "center"; g.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const v = Math.round(x0 + (x1 - x0) * i / 4);
    g.fillText(String(v), X(v), hgt - pad.b + 6);
  }
  g.fillText("step", (pad.l + w - pad.r) / 2, hgt - 16);
  for (const [points, color] of [[train, "#0b4fb3"], [valid, "#b34a00"]]) {
    if (!points.length) continue;
    g.strokeStyle = color; g.fillStyle = color; g.lineWidth = 2;
    g.beginPath();
    points.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
    g.stroke();
    for (const [x, y] of points) { g.beginPath(); g.arc(X(x), Y(y), points.length > 60 ? 1.5 : 3, 0, 2 * Math.PI); g.fill(); }
  }
}

async function viewJob(jobId) {
  const token = viewToken;
  let job;
  try {
    job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
  } catch (err) {
    if (err.status === 404) {
      setMain("Job not found", errorBox(`Job not found: ${err.message}`, "job-not-found"),
        h("p", {}, h("a", { href: "#/jobs" }, "Back to your jobs")));
      return;
    }
    throw err;
  }
  const events = new Map();   // id -> event, everything seen so far
  const statusEl = h("span", { id: "job-status" });
  const progressEl = h("span", { id: "job-progress" }, "—");
  const facts = h("dl", { class: "facts", id: "job-facts" });
  const failure = h("div", { id: "job-failure" });
  const canvas = h("canvas", { id: "loss-chart", role: "img", "aria-label": "Training and validation loss by step" });
  const chartNote = h("p", { class: "hint", id: "chart-note", "aria-live": "polite" });
  const validLegend = h("span", { id: "valid-legend" }, h("span", { class: "swatch", style: "background:#b34a00" }),
    "validation loss");
  const marginCanvas = h("canvas", { id: "margin-chart", role: "img", "aria-label": "DPO reward margin by step" });
  const marginNote = h("p", { class: "hint", id: "margin-note", "aria-live": "polite" });
  const marginBox = h("div", { id: "margin-box", hidden: true }, h("h2", {}, "Reward margin (DPO)"),
    h("div", { class: "chart-wrap" }, marginCanvas, marginNote));
  const rewardCanvas = h("canvas", { id: "reward-chart", role: "img", "aria-label": "Training and validation reward by step" });
  const rewardNote = h("p", { class: "hint", id: "reward-note", "aria-live": "polite" });
  const validRewardLegend = h("span", { id: "valid-reward-legend" },
    h("span", { class: "swatch", style: "background:#b34a00" }), "validation reward");
  const rewardBox = h("div", { id: "reward-box", hidden: true }, h("h2", {}, "Reward (reinforcement)"),
    h("div", { class: "chart-wrap" },
      h("div", { class: "legend", "aria-hidden": "true" },
        h("span", {}, h("span", { class: "swatch", style: "background:#0b4fb3" }), "training reward"),
        validRewardLegend),
      rewardCanvas, rewardNote));
  const log = h("ol", { class: "log", id: "event-log", "aria-label": "Events, newest first" });
  const ckpts = h("div", { id: "checkpoints" });
  const actionMsg = h("div", { id: "action-result", "aria-live": "polite" });
  const button = (label, action, cls) => h("button", { type: "button", class: cls, id: `job-${action}`,
    onclick: async () => {
      actionMsg.replaceChildren();
      try { job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/${action}`, { method: "POST" }); render(); }
      catch (err) { actionMsg.replaceChildren(errorBox(err.message)); }
      poll();
    } }, label);
  const buttons = { pause: button("Pause", "pause", "secondary"), resume: button("Resume", "resume", "secondary"),
                    cancel: button("Cancel job", "cancel", "danger") };

  function render() {
    statusEl.replaceChildren(statusBadge(job.status));
    const hpText = Object.entries(job.hyperparameters).map(([k, v]) => `${k}=${v}`).join(", ");
    const grader = job.method && job.method.reinforcement && job.method.reinforcement.grader;
    const rows = [["Status", statusEl], ["Base model", job.model], ["Method", job.slmtune_method],
      ["Training objective", job.method && job.method.type ? job.method.type : "supervised"],
      ...(grader ? [["Grader", `${grader.name || "(unnamed)"} (${grader.type})`]] : []),
      ["Training file", h("code", {}, job.training_file)], ["Validation file", job.validation_file ? h("code", {}, job.validation_file) : "—"],
      ["Hyperparameters", hpText], ["Created", when(job.created_at)], ["Finished", when(job.finished_at)],
      ["Progress", progressEl], ["Trained tokens", job.trained_tokens ?? "—"],
      ["Fine-tuned model", job.fine_tuned_model ? h("code", { id: "fine-tuned-model" }, job.fine_tuned_model) : "—"]];
    facts.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    failure.replaceChildren(job.status === "failed" && job.error ?
      h("div", { class: "error", role: "alert" }, h("strong", {}, "This job failed. "), job.error.message) : "");
    buttons.pause.disabled = !["queued", "running"].includes(job.status);
    buttons.resume.disabled = job.status !== "paused";
    buttons.cancel.disabled = TERMINAL.includes(job.status);
  }

  function renderEvents() {
    const sorted = [...events.values()].sort((a, b) => b.created_at - a.created_at || (a.id < b.id ? 1 : -1));
    log.replaceChildren(...sorted.map(e => h("li", { class: e.level === "error" ? "error-level" : e.level === "warn" ? "warn" : null },
      `${new Date(e.created_at * 1000).toLocaleTimeString()}  ${e.message}`)));
    const train = new Map(), valid = new Map(), margin = new Map(), validMargin = new Map();
    const reward = new Map(), validReward = new Map(), subRewards = new Map();   // sub-grader name -> (step -> reward)
    const put = (map, step, value) => { if (value !== undefined && value !== null) map.set(step, value); };
    for (const e of events.values()) {
      if (e.type !== "metrics" || !e.data) continue;
      put(train, e.data.step, e.data.train_loss);
      put(valid, e.data.step, e.data.valid_loss);
      put(margin, e.data.step, e.data["rewards/margin"]);         // DPO jobs: chosen minus rejected reward
      put(validMargin, e.data.step, e.data["valid_rewards/margin"]);
      put(reward, e.data.step, e.data.reward);                     // reinforcement jobs: mean grader reward
      put(validReward, e.data.step, e.data.valid_reward);
      for (const [k, value] of Object.entries(e.data)) {           // a multi grader's sub-graders: reward/<name>
        if (!k.startsWith("reward/")) continue;
        if (!subRewards.has(k.slice(7))) subRewards.set(k.slice(7), new Map());
        put(subRewards.get(k.slice(7)), e.data.step, value);
      }
    }
    const pts = m => [...m.entries()].sort((a, b) => a[0] - b[0]);
    const t = pts(train), v = pts(valid);
    showProgress();
    drawChart(canvas, t, v);
    validLegend.hidden = v.length === 0;
    marginBox.hidden = margin.size === 0;
    if (margin.size) {
      const m = pts(margin), vm = pts(validMargin);
      drawChart(marginCanvas, m, vm);
      marginNote.textContent = `Reward margin (preferred minus non-preferred answer's reward): last ${m[m.length - 1][1].toFixed(3)} ` +
        `at step ${m[m.length - 1][0]}` + (vm.length ? `; validation ${vm[vm.length - 1][1].toFixed(3)}` : "") + ".";
    }
    rewardBox.hidden = reward.size === 0;
    if (reward.size) {
      const r = pts(reward), vr = pts(validReward);
      drawChart(rewardCanvas, r, vr, [0, 1]);
      validRewardLegend.hidden = vr.length === 0;
      const byGrader = [...subRewards.entries()].filter(([, m]) => m.size)
        .map(([name, m]) => { const p = pts(m); return `${name} ${p[p.length - 1][1].toFixed(3)}`; });
      rewardNote.textContent = `Mean grader reward of the sampled answers (0 to 1): ${r.length} training point(s), ` +
        `last ${r[r.length - 1][1].toFixed(3)} at step ${r[r.length - 1][0]}` +
        (byGrader.length ? ` (by grader: ${byGrader.join(", ")})` : "") +
        `; ${vr.length} validation point(s)` + (vr.length ? `, last ${vr[vr.length - 1][1].toFixed(3)} at step ${vr[vr.length - 1][0]}` : "") + ".";
    }
    chartNote.textContent = `${t.length} training loss point(s)` + (t.length ? `, last ${t[t.length - 1][1].toFixed(4)} at step ${t[t.length - 1][0]}` : "") +
      `; ${v.length} validation loss point(s)` + (v.length ? `, last ${v[v.length - 1][1].toFixed(4)}` : "") + ".";
  }

  // "Step 5 of 19, about 2 min left": the step events' times give the pace of this job.
  function showProgress() {
    const steps = [...events.values()].filter(e => e.type === "metrics" && e.data && e.data.train_loss !== undefined
      && e.data.total_steps).sort((a, b) => a.data.step - b.data.step);
    if (!steps.length) {
      progressEl.textContent = job.status === "running" ? "starting (loading the model and data)…" :
        job.status === "queued" ? "waiting for a worker" : "—";
      return;
    }
    const last = steps[steps.length - 1], total = last.data.total_steps;
    let text = `step ${last.data.step} of ${total}`;
    if (job.status === "running" && steps.length >= 2 && last.data.step < total) {
      const first = steps[0];
      const perStep = (last.created_at - first.created_at) / Math.max(1, last.data.step - first.data.step);
      const left = perStep * (total - last.data.step);
      if (left > 0) text += `, about ${left < 90 ? Math.ceil(left) + " s" : Math.round(left / 60) + " min"} left`;
    }
    progressEl.textContent = text;
    progressEl.dataset.step = last.data.step;
    progressEl.dataset.total = total;
  }

  async function fetchEvents() {
    // newest first: read pages until one we have already seen (everything on the first visit)
    let after = null;
    for (let i = 0; i < 200; i++) {
      const page = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=100` + (after ? `&after=${after}` : ""));
      let known = false;
      for (const e of page.data) { if (events.has(e.id)) known = true; events.set(e.id, e); }
      if (known || !page.has_more || !page.data.length) break;
      after = page.last_id;
    }
  }

  async function fetchCheckpoints() {
    const list = await listAll(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`);
    if (!list.length) { ckpts.replaceChildren(h("p", {}, "No checkpoints yet.")); return; }
    const fmt = v => (v === null || v === undefined ? "—" : Number(v).toFixed(4));
    ckpts.replaceChildren(h("table", {},
      h("thead", {}, h("tr", {}, ["Step", "Checkpoint", "Train loss", "Validation loss", "Created"].map(t => h("th", { scope: "col", text: t })))),
      h("tbody", {}, list.map(c => h("tr", {}, h("td", { class: "num" }, c.metrics.best ? `${c.step_number} (best)` : c.step_number),
        h("td", {}, h("code", {}, c.fine_tuned_model_checkpoint)), h("td", { class: "num" }, fmt(c.metrics.train_loss)),
        h("td", { class: "num" }, fmt(c.metrics.valid_loss)), h("td", {}, when(c.created_at)))))));
  }

  let busy = false, finalDone = false;
  async function poll() {
    if (busy || token !== viewToken) return;
    busy = true;
    try {
      job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
      await Promise.all([fetchEvents(), fetchCheckpoints()]);
      if (token !== viewToken) return;
      render(); renderEvents();
      if (TERMINAL.includes(job.status)) finalDone = true;
    } catch (err) {
      if (token === viewToken) actionMsg.replaceChildren(errorBox(err.message));
    } finally { busy = false; }
  }

  setMain(`Job ${jobId}`, facts, failure,
    h("div", { class: "buttons" }, buttons.pause, buttons.resume, buttons.cancel), actionMsg,
    h("h2", {}, "Loss"),
    h("div", { class: "chart-wrap" },
      h("div", { class: "legend", "aria-hidden": "true" },
        h("span", {}, h("span", { class: "swatch", style: "background:#0b4fb3" }), "training loss"),
        validLegend),
      canvas, chartNote),
    marginBox, rewardBox,
    h("h2", {}, "Checkpoints"), ckpts, h("h2", {}, "Events"), log);
  render();
  await poll();
  every(2000, () => { if (!finalDone) poll(); });
  // Redrawn at every resize (a canvas drawn at one width and shown at another stretches), for as
  // long as this view is shown.
  const onResize = () => {
    if (token !== viewToken) { window.removeEventListener("resize", onResize); return; }
    renderEvents();
  };
  window.addEventListener("resize", onResize);
}

// --- playground --------------------------------------------------------------------------------
async function streamChat(model, prompt, params, out, stateEl, signal) {
  stateEl.dataset.state = "streaming";
  stateEl.textContent = "streaming…";
  const text = h("span", { class: "content" });
  const calls = [];
  out.replaceChildren(text);
  try {
    const resp = await api("/v1/chat/completions", { method: "POST", raw: true, signal, json: Object.assign(
      { model, stream: true, messages: [{ role: "user", content: prompt }] }, params) });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (signal && signal.aborted) return;   // never write into a newer question's panel
          if (chunk.error) throw new Error(chunk.error.message);
          for (const c of chunk.choices || []) {
            if (!c.delta) continue;
            if (c.delta.content) text.textContent += c.delta.content;
            for (const d of c.delta.tool_calls || []) {   // OpenAI-style deltas, joined per call index
              const call = calls[d.index] = calls[d.index] || { name: "", arguments: "" };
              if (d.function) { call.name += d.function.name || ""; call.arguments += d.function.arguments || ""; }
            }
          }
        }
      }
    }
    const made = calls.filter(Boolean);
    if (made.length) {
      out.append(h("ul", { class: "tool-calls", "aria-label": "Tool calls" }, made.map(c =>
        h("li", {}, h("code", { class: "tool-name" }, c.name), " ", h("code", {}, c.arguments)))));
    }
    stateEl.dataset.state = "done";
    stateEl.textContent = made.length ? `done: ${made.length} tool call${made.length > 1 ? "s" : ""}` : "done";
  } catch (err) {
    if (signal && signal.aborted) return;   // replaced by a newer question: its stream owns the panel now
    stateEl.dataset.state = "error";
    stateEl.textContent = "error: " + err.message;
  }
}

async function viewPlayground() {
  const models = (await api("/v1/models")).data;
  const tuned = models.filter(m => m.parent && m.served);
  if (!tuned.length) {
    setMain("Playground", h("p", {}, "No deployed fine-tuned model yet: a succeeded LoRA/QLoRA/DoRA job on the served base model appears here. ",
      h("a", { href: "#/new" }, "Start a job")));
    return;
  }
  const select = h("select", {}, tuned.map(m => h("option", { value: m.id }, m.id)));
  const baseNote = h("span", { class: "hint", id: "pg-base" });
  const prompt = h("textarea", { required: true, rows: "3" });
  const maxTokens = h("input", { type: "number", min: "1", max: "2048", value: "64" });
  const temperature = h("input", { type: "number", min: "0", max: "2", step: "0.1", value: "0" });
  const tools = h("textarea", { rows: "3", spellcheck: "false",
    placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]' });
  const toolsError = h("div", { id: "pg-tools-error" });
  const toolChoice = h("select", {}, ["auto", "required", "none"].map(v => h("option", { value: v }, v)));
  const panel = (id, title) => {
    const text = h("div", { class: "text", id: `answer-${id}`, "aria-live": "polite" });
    const state = h("span", { class: "hint", id: `state-${id}`, "data-state": "idle" }, "idle");
    const heading = h("h2", {}, title, " ");
    return { el: h("section", { class: "answer", "aria-labelledby": `head-${id}` }, Object.assign(heading, { id: `head-${id}` }), state, text), text, state, heading };
  };
  const ft = panel("ft", "Fine-tuned"), base = panel("base", "Base");
  const parentOf = () => tuned.find(m => m.id === select.value).parent;
  const showBase = () => { baseNote.textContent = `Compared with its base model: ${parentOf()}`; };
  select.addEventListener("change", showBase);
  const form = h("form", { class: "card", id: "pg-form" },
    field("pg-model", "Fine-tuned model", select), baseNote,
    field("pg-prompt", "Prompt", prompt),
    field("pg-tools", "Tools (optional: OpenAI function specs as a JSON list)", tools), toolsError,
    field("pg-tool-choice", "Tool choice (with tools)", toolChoice),
    h("div", { class: "row" }, field("pg-max-tokens", "Max tokens", maxTokens), field("pg-temperature", "Temperature", temperature)),
    h("button", { type: "submit", id: "pg-send" }, "Ask both"));
  let asking = null;   // the AbortController of the streams in flight: asking again cancels them
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const params = { max_tokens: Number(maxTokens.value) || 64, temperature: Number(temperature.value) };
    toolsError.replaceChildren();
    if (tools.value.trim()) {
      try { params.tools = JSON.parse(tools.value); }
      catch (err) { toolsError.replaceChildren(errorBox(`Tools: not valid JSON (${err.message})`)); return; }
      params.tool_choice = toolChoice.value;
    }
    if (asking) asking.abort();
    const mine = asking = new AbortController();
    ft.heading.lastChild.textContent = ` — ${select.value}`;
    base.heading.lastChild.textContent = ` — ${parentOf()}`;
    form.dataset.asks = String(Number(form.dataset.asks || 0) + 1);
    await Promise.all([streamChat(select.value, prompt.value, params, ft.text, ft.state, mine.signal),
                       streamChat(parentOf(), prompt.value, params, base.text, base.state, mine.signal)]);
    if (asking === mine) asking = null;
  });
  setMain("Playground", form, h("div", { class: "side", style: "margin-top:1em" }, ft.el, base.el));
  showBase();
}

// --- start -------------------------------------------------------------------------------------
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  route();
});
