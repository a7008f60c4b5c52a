// sdeks console: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every value shown comes from users or the pipeline: it is set as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const state = { info: null, timer: null, view: null, taskId: null };

function $(selector) { return document.querySelector(selector); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error || { code: "http_" + response.status, message: response.statusText };
    throw Object.assign(new Error(error.message), { code: error.code, field: error.field });
  }
  return body;
}

function post(path, payload) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload || {}),
  });
}

function banner(message) {
  const node = $("#banner");
  node.textContent = message || "";
  node.hidden = !message;
}

// --- formatting ------------------------------------------------------------

function seconds(ms) { return ms === null || ms === undefined ? "-" : (ms / 1000).toFixed(1) + "s"; }

function when(epochMs) {
  if (!epochMs) return "-";
  return new Date(epochMs).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function clock(epochMs) {
  // Today's tasks by time of day (UTC); older ones by date.
  if (!epochMs) return "-";
  const full = when(epochMs);
  return full.slice(0, 10) === when(Date.now()).slice(0, 10) ? full.slice(11) : full.slice(0, 10);
}

function eta(task) {
  if (task.eta_s === null || task.eta_s === undefined) return "-";
  if (["succeeded", "failed", "cancelled"].includes(task.status)) return "-";
  const s = task.eta_s;
  if (s < 90) return "~" + Math.round(s) + "s";
  if (s < 90 * 60) return "~" + Math.round(s / 60) + "m";
  return "~" + Math.round(s / 3600) + "h";
}

function progressText(progress) {
  if (!progress) return "";
  let text = "step " + progress.done + " of " + progress.total;
  if (progress.images && progress.images > 1) {
    text = "step " + progress.step + " of " + progress.steps +
      ", image " + progress.image + " of " + progress.images;
  }
  return text;
}

function progressBar(task) {
  const wrap = el("div", { class: "progress" });
  const bar = el("div", { class: "bar" });
  const fill = el("div", { class: "fill" });
  const p = task.progress;
  // The last progress write may be skipped (writes are throttled): a success is a full bar.
  const fraction = task.status === "succeeded" ? 1 : (p && p.total ? Math.min(1, p.done / p.total) : 0);
  fill.style.width = Math.round(fraction * 100) + "%";
  bar.append(fill);
  wrap.append(bar, el("span", { class: "label", text: task.status === "running" ? progressText(p) : "" }));
  return wrap;
}

function statusBadge(task) {
  const text = task.status + (task.cancel_requested && task.status === "running" ? " (cancelling)" : "");
  return el("span", { class: "status status-" + task.status, text: text });
}

// --- views -------------------------------------------------------------------

async function showTasks() {
  const params = new URLSearchParams();
  const status = $("#filter-status").value;
  const runtime = $("#filter-runtime").value;
  if (status) params.set("status", status);
  if (runtime) params.set("runtime", runtime);
  params.set("limit", "100");
  const { tasks } = await api("/api/tasks?" + params.toString());
  const body = $("#tasks-table tbody");
  const rows = tasks.map((task) => {
    const link = el("a", { href: "#/task/" + encodeURIComponent(task.id), text: task.id });
    const error = task.error ? el("code", { class: "error-code", text: task.error.code, title: task.error.message }) : "";
    return el("tr", { "data-id": task.id, "data-status": task.status },
      el("td", { class: "id-cell" }, link),
      el("td", {}, statusBadge(task)),
      el("td", {}, progressBar(task)),
      el("td", { class: "eta", text: eta(task) }),
      el("td", { text: task.runtime || "-" }),
      el("td", { text: task.model || "-" }),
      el("td", { text: clock(task.received_at), title: when(task.received_at) }),
      el("td", { text: seconds(task.queued_ms) }),
      el("td", { text: seconds(task.execution_ms) }),
      el("td", { text: String(task.images) }),
      el("td", { class: "error-cell" }, error));
  });
  body.replaceChildren(...rows);
  $("#tasks-empty").hidden = tasks.length > 0;
  $("#tasks-count").textContent = tasks.length + " task(s)";
}

function pretty(value) { return value === null || value === undefined ? "-" : JSON.stringify(value, null, 2); }

async function showTask(id) {
  const task = await api("/api/tasks/" + encodeURIComponent(id));
  if (state.view !== "task" || state.taskId !== id) return;
  $("#task-id").textContent = task.id;
  $("#task-status").replaceChildren(statusBadge(task));
  const progress = $("#task-progress");
  progress.hidden = !task.progress || task.status !== "running";
  if (!progress.hidden) {
    const p = task.progress;
    progress.querySelector(".fill").style.width = Math.round(Math.min(1, p.done / p.total) * 100) + "%";
    progress.querySelector(".label").textContent = progressText(p) + "  ETA " + eta(task);
  }
  const live = task.status === "queued" || task.status === "running";
  $("#cancel-button").hidden = !live || state.info.read_only || task.cancel_requested;
  $("#task-error").hidden = !task.error;
  $("#task-error-code").textContent = task.error ? task.error.code : "";
  $("#task-error-message").textContent = task.error ? task.error.message : "";

  const t = task.timings || {};
  const facts = [
    ["runtime", task.runtime], ["tasktype", task.tasktype], ["model", task.model],
    ["pod", task.pod], ["attempts", task.attempts],
    ["queue position", task.queue_position], ["ETA", live ? eta(task) : null],
    ["received", when(task.received_at)], ["started", when(task.started_at)],
    ["finished", when(task.finished_at)],
    ["queued", seconds(task.queued_ms)], ["execution", seconds(task.execution_ms)],
    ["download / load / inference / upload", task.timings ?
      [t.download_ms, t.model_load_ms, t.inference_ms, t.upload_ms].map(seconds).join(" / ") : null],
    ["output", task.output_location],
  ].filter(([, value]) => value !== null && value !== undefined && value !== "-");
  $("#task-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));

  const images = $("#task-images");
  const shown = Array.from(images.querySelectorAll("img")).map((img) => img.dataset.s3).join(" ");
  const wanted = task.images.map((image) => image.s3).join(" ");
  if (shown !== wanted) {  // presigned links change on each poll: rebuild only when the set changes
    images.replaceChildren(...task.images.map((image, n) => el("figure", {},
      el("img", { class: "thumb", src: image.url, alt: task.id + " image " + (n + 1),
                  "data-s3": image.s3, "data-full": image.url }),
      el("figcaption", { text: image.s3 }))));
  }
  const infotexts = task.images.map((image) => image.infotext).filter(Boolean);
  $("#task-infotext").textContent = infotexts.length ? infotexts.join("\n\n") : "-";
  $("#task-manifest").textContent = pretty(task.manifest);
  $("#task-callback").textContent = pretty(task.callback);
}

async function showFleet() {
  const fleet = await api("/api/fleet");
  const queues = fleet.queues.concat(fleet.catch_all ? [fleet.catch_all] : []);
  $("#fleet-queues tbody").replaceChildren(...queues.map((q) => el("tr", { "data-runtime": q.runtime },
    el("td", { text: q.runtime }), el("td", { text: q.queue }),
    el("td", { class: "visible", text: q.error ? "?" : String(q.visible) }),
    el("td", { class: "in-flight", text: q.error ? "?" : String(q.in_flight) }),
    el("td", { class: "dlq", text: q.dlq === undefined ? "-" : String(q.dlq) }))));
  const pods = [];
  for (const [runtime, list] of Object.entries(fleet.pods)) {
    for (const pod of list) {
      const card = el("div", { class: "pod" + (pod.reachable ? "" : " unreachable"), "data-runtime": runtime });
      card.append(el("h3", { text: runtime + " · " + pod.url }));
      if (!pod.reachable) {
        card.append(el("p", { class: "error", text: "unreachable: " + pod.error }));
      } else {
        const s = pod.state || {};
        const models = s.models || {};
        card.append(el("p", { text: (s.device || "?") + ", " + s.free_slots + " of " + s.slots + " slot(s) free" }));
        const table = el("table", { class: "tiers" });
        for (const tier of ["gpu", "ram", "disk", "loading"]) {
          const names = Array.isArray(models[tier]) ? models[tier] : [];
          table.append(el("tr", {}, el("th", { text: tier }), el("td", { text: names.join(", ") || "-" })));
        }
        card.append(table);
        for (const job of s.running || []) {
          card.append(el("p", { class: "muted", text: "running " + job.id + ": step " + job.step + " of " + job.steps +
            ", image " + (job.job_no + 1) + " of " + job.job_count }));
        }
      }
      pods.push(card);
    }
  }
  if (pods.length) $("#fleet-pods").replaceChildren(...pods);
}

async function prepareSubmit() {
  const select = $("#form-model");
  if (select.dataset.loaded) return;
  const { models } = await api("/api/models");
  select.append(...models.map((name) => el("option", { value: name, text: name })));
  select.dataset.loaded = "1";
}

// --- router and polling -------------------------------------------------------

const VIEWS = { tasks: showTasks, task: () => showTask(state.taskId), fleet: showFleet, submit: prepareSubmit };

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [name, ...rest] = hash.split("/");
  state.view = VIEWS[name] ? name : "tasks";
  state.taskId = state.view === "task" ? decodeURIComponent(rest.join("/")) : null;
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + state.view;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.id === "nav-" + (state.view === "task" ? "tasks" : state.view));
  }
  if (state.view === "task") {
    $("#task-images").replaceChildren();
    $("#cancel-result").textContent = "";
  }
  refresh();
}

async function refresh() {
  clearTimeout(state.timer);
  const view = state.view;
  try {
    await VIEWS[view]();
    banner("");
  } catch (error) {
    banner((error.code ? error.code + ": " : "") + error.message);
  }
  // The submit form does not change by itself; everything else is polled.
  if (view !== "submit" && view === state.view) state.timer = setTimeout(refresh, POLL_MS);
}

async function submitForm(event) {
  event.preventDefault();
  const form = event.target;
  const data = Object.fromEntries(new FormData(form).entries());
  const result = $("#submit-result");
  for (const input of form.querySelectorAll(".invalid")) input.classList.remove("invalid");
  result.className = "muted";
  result.textContent = "publishing...";
  try {
    const answer = await post("/api/tasks", data);
    result.textContent = "published " + answer.id;
    location.hash = "#/task/" + encodeURIComponent(answer.id);
  } catch (error) {
    result.className = "error";
    result.textContent = (error.code || "error") + ": " + error.message;
    const input = error.field && form.elements[error.field];
    if (input && input.classList) input.classList.add("invalid");
  }
}

async function cancelTask() {
  const id = state.taskId;
  const button = $("#cancel-button");
  button.disabled = true;
  try {
    const answer = await post("/api/tasks/" + encodeURIComponent(id) + "/cancel");
    $("#cancel-result").textContent = answer.outcome.replace("_", " ");
  } catch (error) {
    $("#cancel-result").textContent = (error.code || "error") + ": " + error.message;
  } finally {
    button.disabled = false;
  }
  refresh();
}

function openLightbox(event) {
  const img = event.target.closest("img.thumb");
  if (!img) return;
  const box = $("#lightbox");
  box.querySelector("img").src = img.dataset.full;
  box.hidden = false;
}

async function start() {
  state.info = await api("/api/info");
  $("#stack-name").textContent = state.info.stack;
  $("#filter-status").append(...state.info.statuses.map((s) => el("option", { value: s, text: s })));
  for (const id of ["#filter-runtime", "#form-runtime"]) {
    $(id).append(...state.info.runtimes.map((r) => el("option", { value: r, text: r })));
  }
  $("#submit-form").hidden = state.info.read_only;
  $("#read-only-note").hidden = !state.info.read_only;
  $("#nav-submit").hidden = state.info.read_only;
  $("#filter-status").addEventListener("change", refresh);
  $("#filter-runtime").addEventListener("change", refresh);
  $("#submit-form").addEventListener("submit", submitForm);
  $("#cancel-button").addEventListener("click", cancelTask);
  $("#task-images").addEventListener("click", openLightbox);
  $("#lightbox").addEventListener("click", () => { $("#lightbox").hidden = true; });
  window.addEventListener("hashchange", route);
  route();
}

start().catch((error) => banner("cannot reach the console API: " + error.message));
