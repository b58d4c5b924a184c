// The playground page: asks for a key when the server wants one, draws the steering controls from the schema
// the server publishes, streams one prompt twice at once (unsteered and steered) and exports the steered request.
import { call, errorText, getJSON, hasKey, readEvents, setKey } from "./api.js";
import { expertBars, sinkHeatmaps } from "./charts.js";
import { curl, openaiPython, sdkPython } from "./exports.js";
import { SpecForm } from "./schema_form.js";

const $ = (sel) => document.querySelector(sel);
const page = { form: null, model: null, exportKind: "curl", lastSteered: null };

function status(text, isError = false) {
  $("#status").textContent = text;
  $("#status").className = isError ? "error" : "";
}

// --- the steering spec: controls and raw JSON editor, kept in sync ---

function showJSON(value) {
  $("#spec-json").value = JSON.stringify(value, null, 2);
  $("#spec-error").textContent = "";
  refreshExport();
}

function specFromEditor() {
  try {
    const value = JSON.parse($("#spec-json").value || "{}");
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("must be a JSON object");
    $("#spec-error").textContent = "";
    return value;
  } catch (err) {
    $("#spec-error").textContent = `raw JSON: ${err.message}`;
    return null;
  }
}

$("#spec-json").addEventListener("input", () => {
  const value = specFromEditor();
  if (value !== null) {
    page.form.setValue(value);
    refreshExport();
  }
});

// --- the request both panes send ---

function request(steered) {
  const chat = $("#kind").value === "chat";
  const body = { model: $("#model").value };
  if (chat) {
    const messages = [];
    if ($("#system").value.trim()) messages.push({ role: "system", content: $("#system").value });
    messages.push({ role: "user", content: $("#prompt").value });
    body.messages = messages;
  } else body.prompt = $("#prompt").value;
  body.max_tokens = Number($("#max-tokens").value) || 48;
  body.temperature = Number($("#temperature").value);
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  const spec = page.form ? page.form.value : {};
  if (steered && Object.keys(spec).length) body.steering = spec;
  return { path: chat ? "/v1/chat/completions" : "/v1/completions", body, chat };
}

function meta(pane, rows) {
  const dl = pane.querySelector(".meta");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dd.dataset.field = k;
    dl.append(dt, dd);
  }
}

// Runs one request into a pane; streamed unless `whole` (the routed-expert counts come only unstreamed).
async function runPane(pane, req, whole) {
  const out = pane.querySelector(".output");
  out.textContent = "";
  out.classList.remove("error");
  meta(pane, [["status", "running…"]]);
  const started = performance.now();
  let first = null, usage = null, text = "", stats = null;
  const body = whole ? { ...req.body, steering_stats: { routed_experts: true } }
    : { ...req.body, stream: true, stream_options: { include_usage: true } };
  try {
    const response = await call(req.path, { method: "POST", body });
    if (!response.ok) throw new Error(await errorText(response));
    const applied = response.headers.get("X-Steering-Applied") ?? "(absent)";
    const adapter = response.headers.get("X-Adapter-Applied");
    if (whole) {
      const data = await response.json();
      first = performance.now();
      text = req.chat ? data.choices[0].message.content : data.choices[0].text;
      usage = data.usage;
      stats = data.steering_stats;
      out.textContent = text;
    } else {
      await readEvents(response, (event) => {
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const piece = req.chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
          if (piece && first === null) first = performance.now();
          text += piece;
          out.textContent = text;
        }
      });
    }
    const total = performance.now() - started;
    meta(pane, [
      ["X-Steering-Applied", applied],
      ...(adapter ? [["X-Adapter-Applied", adapter]] : []),
      ["tokens", usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated` : "?"],
      ["latency", `${Math.round(total)} ms` + (first !== null && !whole ? `, first token ${Math.round(first - started)} ms` : "")],
    ]);
    pane.dataset.done = "true";
    return stats;
  } catch (err) {
    out.textContent = String(err.message || err);
    out.classList.add("error");
    meta(pane, [["status", "failed"]]);
    pane.dataset.done = "error";
    return null;
  }
}

$("#run").addEventListener("click", async () => {
  if (specFromEditor() === null) return;
  const plain = $("#pane-plain"), steered = $("#pane-steered");
  plain.dataset.done = steered.dataset.done = "";
  $("#run").disabled = true;
  const whole = !$("#stats-label").hidden && $("#expert-stats").checked;
  page.lastSteered = request(true);
  const [, stats] = await Promise.all([runPane(plain, request(false), false), runPane(steered, page.lastSteered, whole)]);
  $("#run").disabled = false;
  if (stats && stats.routed_experts) {
    const off = (page.form.value.experts && page.form.value.experts.off) || [];
    $("#experts").replaceChildren(Object.assign(document.createElement("h3"), { textContent: "routed experts (steered)" }),
                                  expertBars(stats.routed_experts, off));
  }
});

// --- export ---

function refreshExport() {
  if (!page.form) return;
  const req = request(true);
  const make = { curl, openai: openaiPython, sdk: sdkPython }[page.exportKind];
  $("#export-text").textContent = make(req, window.location.origin);
  $("#export-text").dataset.kind = page.exportKind;
}

for (const button of document.querySelectorAll("[data-export]")) {
  button.addEventListener("click", () => {
    page.exportKind = button.dataset.export;
    refreshExport();
  });
}
for (const id of ["#kind", "#model", "#system", "#prompt", "#max-tokens", "#temperature", "#seed"]) {
  $(id).addEventListener("input", refreshExport);
}
$("#copy").addEventListener("click", () => navigator.clipboard.writeText($("#export-text").textContent));

// --- profiles ---

async function listProfiles() {
  const data = await getJSON("/v1/steering/profiles");
  const select = $("#profile");
  select.replaceChildren(new Option("(none)", ""));
  for (const p of data.data || []) {
    const name = typeof p === "string" ? p : p.name;
    const scope = typeof p === "string" ? "" : p.scope ? ` (${p.scope})` : "";
    select.append(new Option(name + scope, name));
  }
}

$("#profile-load").addEventListener("click", async () => {
  const name = $("#profile").value;
  if (!name) return;
  try {
    const data = await getJSON(`/v1/steering/profiles/${encodeURIComponent(name)}`);
    page.form.setValue(data.spec);
    showJSON(page.form.value);
    status(`loaded profile ${name}`);
  } catch (err) {
    status(err.message, true);
  }
});

$("#profile-save").addEventListener("click", async () => {
  const name = $("#profile-name").value.trim();
  if (!name) return status("name the profile first", true);
  const response = await call(`/v1/steering/profiles/${encodeURIComponent(name)}`, { method: "PUT", body: page.form.value });
  if (!response.ok) return status(await errorText(response), true);
  status(`saved profile ${name}`);
  await listProfiles().catch(() => {});
});

// --- start: key, model, schema ---

async function start() {
  let models;
  try {
    models = await getJSON("/v1/models");
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      $("#key-form").hidden = false;
      status(hasKey() ? `key refused: ${err.message}` : "this server needs an API key", true);
      $("#api-key").focus();
      return;
    }
    status(`${err.message}; retrying…`, true);
    setTimeout(start, 2000);
    return;
  }
  $("#key-form").hidden = true;
  const select = $("#model");
  select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
  const [schema, shape] = await Promise.all([getJSON("/v1/steering/schema"), getJSON("/playground/api/model")]);
  page.model = shape;
  $("#model-name").textContent = `${shape.name}: ${shape.num_layers} layers x ${shape.num_heads} heads` +
    (shape.moe_layers.length ? `, ${shape.num_experts} experts (top ${shape.experts_top_k})` : "");
  $("#stats-label").hidden = shape.moe_layers.length === 0;
  page.form = new SpecForm($("#controls"), schema, { model: shape, onChange: showJSON });
  page.form.setValue(specFromEditor() || {});
  showJSON(page.form.value);
  await listProfiles().catch((err) => status(err.message, true));
  getJSON("/playground/api/sinks").then((profile) => {
    $("#sinks").replaceChildren(Object.assign(document.createElement("h3"),
      { textContent: `sink profile of ${profile.model} (${profile.texts} texts)` }), sinkHeatmaps(profile));
  }).catch(() => {});
  document.body.dataset.ready = "true";
  status("ready");
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setKey($("#api-key").value);
  $("#api-key").value = "";
  start();
});

start();
