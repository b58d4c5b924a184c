// The current steered request as code to run elsewhere: a curl command, an openai-python snippet (steering in
// `extra_body`) and a steerserve-client (SDK) snippet. The key is never written out: each reads it from
// $STEERSERVE_API_KEY. Exports are non-streaming so they print one JSON answer.

function shellQuote(s) {
  return `'${s.replace(/'/g, "'\\''")}'`;
}

// A JSON value as a Python literal (true/false/null become True/False/None; strings stay JSON-escaped, which
// Python reads the same).
export function pyLiteral(v, indent = 0) {
  const pad = " ".repeat(indent + 4);
  if (v === null || v === undefined) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "number" || typeof v === "string") return JSON.stringify(v);
  if (Array.isArray(v)) {
    const inner = v.map((x) => pyLiteral(x, indent + 4));
    return inner.join(", ").length < 80 ? `[${inner.join(", ")}]` : `[\n${inner.map((x) => pad + x).join(",\n")},\n${" ".repeat(indent)}]`;
  }
  const items = Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${pyLiteral(x, indent + 4)}`);
  const flat = `{${items.join(", ")}}`;
  return flat.length < 80 ? flat : `{\n${items.map((x) => pad + x).join(",\n")},\n${" ".repeat(indent)}}`;
}

// request: {path, body} as the page sends it (body without `stream`); origin: the server's URL.
export function curl(request, origin) {
  const body = { ...request.body };
  delete body.stream;
  delete body.stream_options;
  return [
    `curl -sS ${shellQuote(origin + request.path)}`,
    `  -H 'Content-Type: application/json'`,
    `  -H "Authorization: Bearer $STEERSERVE_API_KEY"`,
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join(" \\\n");
}

export function openaiPython(request, origin) {
  const { model, steering, messages, prompt, ...rest } = request.body;
  delete rest.stream;
  delete rest.stream_options;
  const chat = messages !== undefined;
  const args = [`model=${pyLiteral(model)}`, chat ? `messages=${pyLiteral(messages, 4)}` : `prompt=${pyLiteral(prompt)}`];
  for (const [k, v] of Object.entries(rest)) args.push(`${k}=${pyLiteral(v, 4)}`);
  if (steering) args.push(`extra_body={"steering": ${pyLiteral(steering, 4)}}`);
  const create = chat ? "client.chat.completions" : "client.completions";
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${pyLiteral(origin + "/v1")}, api_key=os.environ.get("STEERSERVE_API_KEY", "none"))`,
    `raw = ${create}.with_raw_response.create(`,
    ...args.map((a) => `    ${a},`),
    ")",
    'print(raw.headers.get("X-Steering-Applied"))',
    `print(raw.parse().choices[0].${chat ? "message.content" : "text"})`,
  ].join("\n");
}

export function sdkPython(request, origin) {
  const { model, steering, messages, prompt, ...rest } = request.body;
  delete rest.stream;
  delete rest.stream_options;
  const chat = messages !== undefined;
  const args = [chat ? pyLiteral(messages, 4) : pyLiteral(prompt), `model=${pyLiteral(model)}`];
  for (const [k, v] of Object.entries(rest)) args.push(`${k}=${pyLiteral(v, 4)}`);
  if (steering) args.push(`steering=${pyLiteral(steering, 4)}`);
  return [
    "from steerserve_client import SteerClient",
    "",
    `client = SteerClient(${pyLiteral(origin)})  # the key: $STEERSERVE_API_KEY`,
    `r = client.${chat ? "chat" : "complete"}(`,
    ...args.map((a) => `    ${a},`),
    ")",
    "print(r.applied)  # the fingerprint and methods of X-Steering-Applied",
    "print(r.text)",
  ].join("\n");
}
