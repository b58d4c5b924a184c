"""The playground's HTTP side, in process over a fake engine: the page and its files with a strict CSP, nothing
inline for the CSP to forbid, the key never stored, the helpers authenticated like the API, and --no-playground
turning it all into a 404. What the page does in a browser is tested in tests/e2e/test_playground_browser.py."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from steerserve.server.cli import serve as serve_cli
from steerserve.server.http.app import create_app
from steerserve.server.http.auth import KeyStore
from steerserve.server.http.routes.playground import CSP, STATIC_DIR, STATIC_FILES
from steerserve.server.settings import Settings
from steerserve.server.stores.profiles import ProfileStore
from tests.http.conftest import App, _started
from tests.http.fake_engine import NAME, FakeEngine
from tests.http.test_validation import assert_openai_error

pytestmark = pytest.mark.anyio


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        if self.tags and self.tags[-1][0] == "script":
            self.script_text += data.strip()


def directives(csp: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}


async def test_the_page_and_its_files_carry_a_strict_csp(served: App):
    async with served.client(None) as anyone:  # the page itself needs no key: a browser cannot send one
        page = await anyone.get("/playground")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = directives(page.headers["content-security-policy"])
        assert policy["default-src"] == ["'self'"]
        for kind in ("script-src", "style-src", "connect-src"):
            assert policy[kind] == ["'self'"], kind
        assert policy["object-src"] == policy["base-uri"] == policy["form-action"] == ["'none'"]
        assert policy["frame-ancestors"] == ["'none'"]
        assert not re.search(r"unsafe-|data:|\*|https?:", page.headers["content-security-policy"])
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        tags = Tags()
        tags.feed(page.text)
        loaded = [a.get("src") or a.get("href") for t, a in tags.tags if t in ("script", "link")]
        assert loaded and all(u.startswith("/playground/static/") for u in loaded)  # nothing from elsewhere
        for url in loaded:
            r = await anyone.get(url)
            assert r.status_code == 200 and r.headers["content-security-policy"] == CSP, url
            assert r.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")


async def test_nothing_inline_for_the_csp_to_forbid(served: App):
    """No inline script, style or event handler in the page, and no eval-like call or stored key in the script."""
    html = (STATIC_DIR / "index.html").read_text()
    tags = Tags()
    tags.feed(html)
    assert tags.script_text == ""
    for tag, attrs in tags.tags:
        assert tag != "style"
        assert "style" not in attrs and not any(a.startswith("on") for a in attrs), (tag, attrs)
        if tag == "script":
            assert attrs.get("src"), "inline script"
    for name in STATIC_FILES:
        if name.endswith(".js"):
            code = re.sub(r"(^|\s)//.*$", "", (STATIC_DIR / name).read_text(), flags=re.M)  # comments may name them
            for banned in ("eval(", "new Function", "innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                           "localStorage", "sessionStorage", "indexedDB", "document.cookie", 'setAttribute("style"',
                           "setTimeout(\""):
                assert banned not in code, (name, banned)
            # Nothing is fetched from elsewhere: the only absolute URL is SVG's namespace, which is a name.
            assert re.findall(r"https?://[^\s\"']*", code) in ([], ["http://www.w3.org/2000/svg"]), name


async def test_every_shipped_file_is_served_and_nothing_else(served: App):
    shipped = {p.name for p in STATIC_DIR.iterdir()} - {"index.html"}
    assert shipped == set(STATIC_FILES)
    async with served.client(None) as anyone:
        for name in ("index.html", "..%2Fapp.py", "nope.js", "%2e%2e%2f%2e%2e%2fapp.py"):
            r = await anyone.get(f"/playground/static/{name}")
            assert r.status_code == 404, name
        assert (await anyone.get("/playground/static/../routes/playground.py")).status_code == 404


async def test_the_helpers_are_authenticated_like_the_api(served: App, alice: httpx.AsyncClient):
    async with served.client(None) as anyone:
        assert_openai_error(await anyone.get("/playground/api/model"), 401, named=False)
        assert_openai_error(await anyone.get("/playground/api/sinks"), 401, named=False)
    shape = (await alice.get("/playground/api/model")).json()
    assert shape == {"name": NAME, "max_model_len": 1024, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                     "moe_layers": [], "num_experts": 0, "experts_top_k": 0, "unsupported": {}}


async def test_the_sink_profile_comes_from_the_data_dir(served: App, alice: httpx.AsyncClient):
    assert_openai_error(await alice.get("/playground/api/sinks"), 404, param="sinks", code="sink_profile_not_found")
    path = served.app.state.steerserve.profiles.path.parent / "sinks.json"
    profile = {"model": NAME, "texts": 3, "num_layers": 2, "num_heads": 4, "key0_mass": [[0.5] * 4] * 2}
    path.write_text(json.dumps(profile))
    assert (await alice.get("/playground/api/sinks")).json() == profile
    path.write_text("{not json")
    assert_openai_error(await alice.get("/playground/api/sinks"), 404, param="sinks", code="sink_profile_not_found")


async def test_no_playground_is_a_404(tmp_path: Path, tokenizer, api_keys):
    engine = FakeEngine(tokenizer)
    app = create_app(lambda: engine, KeyStore.load(Path(api_keys["file"])), ProfileStore(tmp_path / "p.db"),
                     playground=False)
    async with app.router.lifespan_context(app):
        await _started(app)
        off = App(app, engine, api_keys)
        async with off.client("alice") as alice:
            for path in ("/playground", "/playground/static/playground.js", "/playground/api/model"):
                assert (await alice.get(path)).status_code == 404, path
            assert (await alice.get("/v1/models")).status_code == 200  # the API itself is unchanged


def test_the_setting_and_its_flag():
    assert Settings.load().playground is True
    import argparse

    parser = argparse.ArgumentParser()
    serve_cli.add_settings_flags(parser)
    assert parser.parse_args(["--no-playground"]).playground is False
    assert parser.parse_args([]).playground is None  # unset: env / YAML / default decide
    assert Settings.load(playground=False).playground is False
