"""The playground in a real browser: Debian's Chromium driven by Playwright against the shared SmolLM2 server
(API keys on). The page asks for the key, draws controls from the published schema (a family it has never seen
included), runs one prompt unsteered and steered side by side, and exports a curl command that gives the
steered answer again. Answers are checked against the same requests sent to the API directly.

Needs /usr/bin/chromium (`make test` installs it when run as root with apt, as in CI) and the `playwright`
package (the dev extra; never `playwright install`: the system browser is used). Without them the tests skip,
saying how to run them. `STEERSERVE_PLAYGROUND_SCREENSHOT=1` also writes docs/images/playground.png."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import auth

CHROMIUM = Path(os.environ.get("STEERSERVE_CHROMIUM", "/usr/bin/chromium"))
# Headless on a machine without a GPU or a network beyond its own: no sandbox (root in CI), no GPU, and none of
# Chromium's own background connections (the closed network refuses them, which stalls start-up).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "playground.png"
HOW = ("run `apt-get install -y chromium` as root (or `make test` as root, which does it) and install the dev "
       "extra (`pip install -e .[dev]`, which has playwright); then `pytest tests/e2e/test_playground_browser.py`")

# Decided before any fixture runs, so a machine without the browser does not start the session server for nothing.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: {HOW}")]
sync_api = pytest.importorskip("playwright.sync_api", reason=f"the playwright package is not installed: {HOW}")


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=FLAGS, viewport={"width": 1280, "height": 1000})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context, server):
    """A fresh tab that records console errors (a CSP violation is one) and every request the page sends."""
    tab = browser_context.new_page()
    tab.errors, tab.sent = [], []
    # Chromium also logs every 4xx response as an error (the key probe's 401, no sink profile's 404): not ours.
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" and
           not m.text.startswith("Failed to load resource") else None)
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    tab.on("request", lambda r: tab.sent.append((r.method, r.url, r.headers)))
    yield tab
    tab.close()


def sign_in(page, server, key: str) -> None:
    page.goto(f"{server.url}/playground")
    page.wait_for_selector("#key-form:not([hidden])")  # the server has keys: the page asks for one
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    assert page.input_value("#api-key") == ""


def slide(page, selector: str, value: str) -> None:
    """Move a slider as a user's drag does: set its value and fire `input`."""
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def spec_json(page) -> dict:
    return json.loads(page.input_value("#spec-json"))


def test_side_by_side_steering_and_export(page, server, api_keys, model_name, tmp_path):
    key = api_keys["alice"]
    sign_in(page, server, key)
    # Controls: a logit bias through the map editor, the sink gamma through its (logarithmic) slider.
    page.check('[data-path="logits"][data-action=toggle]')
    page.fill('[data-path="logits.bias"][data-role=new-key]', " Paris")
    page.click('[data-path="logits.bias"][data-action=add]')
    page.fill('input[type=number][data-path="logits.bias. Paris"]', "-100")
    page.press('input[type=number][data-path="logits.bias. Paris"]', "Tab")
    page.check('[data-path="attention"][data-action=toggle]')
    page.check('[data-path="attention.sink"][data-action=toggle]')
    slide(page, 'input[type=range][data-path="attention.sink.gamma"]', "-0.3")  # log10 scale: gamma ~0.5
    spec = spec_json(page)  # the raw JSON editor follows the controls
    gamma = spec["attention"]["sink"]["gamma"]
    assert abs(gamma - 10 ** -0.3) < 1e-3
    assert spec == {"logits": {"bias": {" Paris": -100}}, "attention": {"sink": {"gamma": gamma}}}
    # ... and the controls follow the raw JSON editor.
    page.fill("#spec-json", json.dumps({**spec, "attention": {"sink": {"gamma": 0.25}}}))
    assert page.input_value('input[type=number][data-path="attention.sink.gamma"]') == "0.25"
    page.fill("#spec-json", json.dumps(spec))

    page.fill("#max-tokens", "16")
    page.click("#run")
    page.wait_for_selector("#pane-plain[data-done=true]", timeout=60_000)
    page.wait_for_selector("#pane-steered[data-done=true]", timeout=60_000)
    plain, steered = page.inner_text("#pane-plain .output"), page.inner_text("#pane-steered .output")
    applied = page.inner_text('#pane-steered dd[data-field="X-Steering-Applied"]')
    assert "methods=attention.sink,logits.bias" in applied
    assert "generated" in page.inner_text('#pane-steered dd[data-field="tokens"]')
    assert "ms" in page.inner_text('#pane-steered dd[data-field="latency"]')

    # The panes hold what the API answers to the same requests, sent directly (temperature 0).
    def direct(steering: dict | None) -> httpx.Response:
        body = {"model": model_name, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}
        return httpx.post(f"{server.url}/v1/chat/completions", headers=auth(key), timeout=120,
                          json={**body, **({"steering": steering} if steering else {})})
    want_plain, want_steered = direct(None), direct(spec)
    assert plain == want_plain.json()["choices"][0]["message"]["content"] and "Paris" in plain
    assert steered == want_steered.json()["choices"][0]["message"]["content"] != plain
    assert applied == want_steered.headers["X-Steering-Applied"]
    assert page.inner_text('#pane-plain dd[data-field="X-Steering-Applied"]') == \
        want_plain.headers.get("X-Steering-Applied", "(absent)")

    # Export as curl and run it: the same steered answer; the key is read from the environment, never written.
    page.click("[data-export=curl]")
    command = page.inner_text("#export-text")
    assert key not in command and "$STEERSERVE_API_KEY" in command
    assert shutil.which("curl"), "curl is needed to run the exported command"
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "STEERSERVE_API_KEY": key})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["choices"][0]["message"]["content"] == steered
    # The openai-python and SDK snippets too: each prints the steered answer (and what was applied).
    for kind in ("openai", "sdk"):
        page.click(f"[data-export={kind}]")
        snippet = page.inner_text("#export-text")
        assert key not in snippet
        run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "STEERSERVE_API_KEY": key})
        assert run.returncode == 0, run.stderr
        assert steered in run.stdout and "attention.sink" in run.stdout, (kind, run.stdout)

    # Every JSON call is sent as JSON with the key in its header only; nothing is stored; no CSP violation.
    # (Only the first call, which finds out that the server wants a key, goes without one.)
    unauthenticated = []
    for method, url, headers in page.sent:
        assert key not in url
        if method in ("POST", "PUT"):
            assert headers.get("content-type") == "application/json", (method, url)
        if "/v1/" in url or "/playground/api/" in url:
            if "authorization" in headers:
                assert headers["authorization"] == f"Bearer {key}", url
            else:
                unauthenticated.append(url)
    assert unauthenticated == [f"{server.url}/v1/models"]
    stored = page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie, location.href]")
    assert stored[:3] == [0, 0, ""] and key not in stored[3]
    assert page.errors == []

    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    if os.environ.get("STEERSERVE_PLAYGROUND_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)


def test_profiles_save_and_load(page, server, api_keys):
    sign_in(page, server, api_keys["bob"])
    spec = {"logits": {"bias": {" owl": 3.5}}}
    page.fill("#spec-json", json.dumps(spec))
    page.fill("#profile-name", "playground-owl")
    page.click("#profile-save")
    page.wait_for_selector("#profile option[value=playground-owl]", state="attached")
    stored = httpx.get(f"{server.url}/v1/steering/profiles/playground-owl", headers=auth(api_keys["bob"])).json()
    assert stored["spec"] == spec
    page.fill("#spec-json", "{}")
    assert page.locator('[data-path="logits"][data-action=toggle]').is_checked() is False
    page.select_option("#profile", "playground-owl")
    page.click("#profile-load")
    page.wait_for_function("() => document.querySelector('#spec-json').value.includes('owl')")
    assert spec_json(page) == spec
    assert page.input_value('input[type=number][data-path="logits.bias. owl"]') == "3.5"
    assert page.errors == []


def test_controls_come_from_the_schema(page, server, api_keys):
    """A family the page has never seen, added to the published schema, gets its controls: a slider, a select,
    a checkbox and the layer x head grid, sized by the served model."""
    extra = {"type": "object", "additionalProperties": False, "title": "NewSpec", "properties": {
        "scale": {"type": "number", "minimum": -4, "maximum": 4, "description": "how far"},
        "direction": {"enum": ["up", "down"], "type": "string", "default": "up"},
        "normalise": {"type": "boolean", "default": False},
        "gains": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0},
                  "description": 'Gain per "<layer>.<head>".'}}}

    def with_extra_family(route):
        schema = route.fetch().json()
        schema["$defs"]["NewSpec"] = extra
        schema["properties"]["zz_new"] = {"anyOf": [{"$ref": "#/$defs/NewSpec"}, {"type": "null"}], "default": None}
        route.fulfill(json=schema)

    page.route("**/v1/steering/schema", with_extra_family)
    sign_in(page, server, api_keys["alice"])
    page.check('[data-path="zz_new"][data-action=toggle]')
    slide(page, 'input[type=range][data-path="zz_new.scale"]', "2")
    page.select_option('select[data-path="zz_new.direction"]', '"down"')
    page.check('input[type=checkbox][data-path="zz_new.normalise"]')
    shape = httpx.get(f"{server.url}/playground/api/model", headers=auth(api_keys["alice"])).json()
    grid = page.locator('table.grid[data-path="zz_new.gains"]')
    assert grid.locator("tr").count() == shape["num_layers"] + 1  # + the header row
    assert grid.locator("input").count() == shape["num_layers"] * shape["num_heads"]
    cell = f'input[data-path="zz_new.gains.{shape["num_layers"] - 1}.{shape["num_heads"] - 1}"]'
    page.fill(cell, "0.5")
    page.press(cell, "Tab")
    assert spec_json(page) == {"zz_new": {"scale": 2, "direction": "down", "normalise": True,
                                          "gains": {f'{shape["num_layers"] - 1}.{shape["num_heads"] - 1}': 0.5}}}
    assert page.errors == []


def test_pictures(page, server, api_keys):
    """The sink profile in the server's data dir as three layer x head heatmaps with the flagged heads marked."""
    shape = httpx.get(f"{server.url}/playground/api/model", headers=auth(api_keys["alice"])).json()
    layers, heads = shape["num_layers"], shape["num_heads"]
    ramp = [[(layer * heads + head) / (layers * heads - 1) for head in range(heads)] for layer in range(layers)]
    profile = {"model": shape["name"], "texts": 2, "num_layers": layers, "num_heads": heads, "key0_mass": ramp,
               "row_entropy": ramp, "col_entropy": ramp, "sink_heads": ["0.1"], "dormant_heads": ["1.2", "2.3"]}
    sinks = server.adapter_root.parent / "data" / "sinks.json"  # the session server's --data-dir
    sinks.write_text(json.dumps(profile))
    try:
        sign_in(page, server, api_keys["alice"])
        page.wait_for_selector("#sinks svg")
        maps = page.locator("#sinks svg")
        assert maps.count() == 3
        for i, marked in enumerate((2, 1, 1)):
            assert maps.nth(i).locator("rect").count() == layers * heads
            assert maps.nth(i).locator("text.mark").count() == marked
        fill = [maps.nth(0).locator(f'rect[data-head="{h}"]').get_attribute("fill")
                for h in ("0.0", f"{layers // 2}.0", f"{layers - 1}.{heads - 1}")]
        darkness = [sum(int(c) for c in f[4:-1].split(",")) for f in fill]
        assert darkness[0] > darkness[1] > darkness[2]  # more mass, darker
    finally:
        sinks.unlink()
    assert page.errors == []


def test_expert_counts_of_the_steered_answer(page, server, api_keys):
    """On an MoE model the page asks for the steered answer's routed-expert counts (unstreamed, with
    steering_stats) and draws them. The session model is dense, so the model's shape and that one answer are
    stood in for by the browser; the unsteered answer comes from the server."""
    asked = []

    def moe_shape(route):
        shape = route.fetch().json()
        route.fulfill(json={**shape, "moe_layers": [1, 3], "num_experts": 4, "experts_top_k": 2})

    def steered_with_stats(route):
        body = json.loads(route.request.post_data)
        if "steering" not in body:
            return route.continue_()
        asked.append(body)
        route.fulfill(json={"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "length",
                                         "message": {"role": "assistant", "content": "routed"}}],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                            "steering_stats": {"routed_experts": {"1": [4, 0, 2, 8], "3": [1, 1, 1, 1]}}},
                      headers={"X-Steering-Applied": "abc; methods=experts.off"})

    page.route("**/playground/api/model", moe_shape)
    page.route("**/v1/chat/completions", steered_with_stats)
    sign_in(page, server, api_keys["alice"])
    page.check("#expert-stats")  # shown only for an MoE model
    page.fill("#spec-json", json.dumps({"experts": {"off": ["1.1"]}}))
    page.fill("#max-tokens", "4")
    page.click("#run")
    page.wait_for_selector("#pane-steered[data-done=true]")
    page.wait_for_selector("#pane-plain[data-done=true]", timeout=60_000)
    assert asked and asked[0]["steering_stats"] == {"routed_experts": True} and "stream" not in asked[0]
    assert asked[0]["steering"] == {"experts": {"off": ["1.1"]}}
    bars = page.eval_on_selector_all("#experts rect", """(rects) => rects.map(
        (r) => [r.dataset.expert, r.getAttribute('class'), Number(r.getAttribute('height'))])""")
    assert [b[0] for b in bars] == ["1.0", "1.1", "1.2", "1.3", "3.0", "3.1", "3.2", "3.3"]
    assert [b[1] for b in bars] == ["on", "off", "on", "on", "on", "on", "on", "on"]
    assert [b[2] for b in bars] == [30, 1, 15, 60, 60, 60, 60, 60]  # to scale per layer; an empty bar is 1 px
