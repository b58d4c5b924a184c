// The page's only way to the server: the public API, with the key the user typed, held in this module's memory
// only (never in the URL, a cookie, localStorage or sessionStorage: reloading the page forgets it). Every call
// with a body sends it as JSON with `Content-Type: application/json`.

let apiKey = "";

export function setKey(key) {
  apiKey = key.trim();
}

export function hasKey() {
  return apiKey !== "";
}

function headers(extra, withBody) {
  const h = { Accept: "application/json", ...extra };
  if (withBody) h["Content-Type"] = "application/json";
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

// fetch() on this server's API; `body` (any JSON value) is sent as JSON. Returns the Response.
export function call(path, { method = "GET", body, signal, extraHeaders = {} } = {}) {
  const withBody = body !== undefined;
  return fetch(path, {
    method, signal, headers: headers(extraHeaders, withBody), credentials: "omit", cache: "no-store",
    body: withBody ? JSON.stringify(body) : undefined,
  });
}

// The error message of a failed response, from OpenAI's error shape when it has one.
export async function errorText(response) {
  const text = await response.text();
  try {
    const err = JSON.parse(text).error;
    if (err && err.message) return `${response.status}: ${err.message}${err.param ? ` (param: ${err.param})` : ""}`;
  } catch (_) { /* not JSON */ }
  return `${response.status}: ${text.slice(0, 300)}`;
}

// GET a JSON resource; throws Error(errorText) when it fails.
export async function getJSON(path) {
  const r = await call(path);
  if (!r.ok) throw Object.assign(new Error(await errorText(r)), { status: r.status });
  return r.json();
}

// Reads an SSE body, calling onEvent(parsed JSON) for every `data:` line until `[DONE]` or the end.
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}
