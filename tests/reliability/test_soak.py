"""The soak and fault run, short: `python -m benchmarks.soak --duration 60` (its own supervised server, with
vLLM's engine in a child process so it can be killed), three tenants' mixed traffic, the EngineCore SIGKILLed
after 20 s, the supervisor bringing the server back.

What must hold, each a check of the run's report (benchmarks/soak_report.py): no 5xx outside the kill window;
every unsteered greedy answer under load equal to the unloaded run's; no other failure outside the window (bad
input a 4xx in OpenAI's shape, every other kind a 200); every kind and every steering method the model takes
served; the engine's request count drained to 0; the same greedy answers from the restarted, unloaded server.
The ten-minute run is `make soak`.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import soak

# Two server start-ups: minutes on a loaded 2-core machine; the run bounds itself (--max-extra) well below this.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("soak")
    soak.main(["--duration", "60", "--kill-at", "20", "--unready-grace", "5", "--after-recovery", "5",
               "--max-extra", "300", "--out", str(out), "--work-dir", str(out / "work"), "--name", "soak-ci"])
    assert (out / "soak-ci.png").stat().st_size > 0
    return json.loads((out / "soak-ci.json").read_text())


@pytest.mark.parametrize("name", ["no_5xx_outside_kill_window", "greedy_equal_to_unloaded_run",
                                  "no_other_failure_outside_kill_window", "every_kind_served",
                                  "every_steering_method_served", "engine_requests_drained",
                                  "greedy_unchanged_after_the_soak", "engine_killed_and_recovered"])
def test_soak_check(report, name):
    check = report["checks"][name]
    assert check["ok"], json.dumps(check["detail"], indent=1)[:4000]


def test_soak_report_has_what_the_docs_promise(report):
    kinds = report["kinds"]
    assert set(kinds) >= {"plain", "completions", "stream", "steered", "adapter-lora", "adapter-iapt",
                          "disconnect", "bad"}
    for kind in ("plain", "steered", "stream"):
        assert kinds[kind]["e2e_p50_s"] is not None and kinds[kind]["e2e_p99_s"] is not None
    assert report["kill_window"]["length_s"] > 0
    assert {e["event"] for e in report["events"]} >= {"engine_killed", "restart", "start", "ready"}
    incarnations = {s["incarnation"] for s in report["samples"]}
    assert len(incarnations) >= 2, "resources were sampled from both server starts"
    assert all(s["server_rss_mib"] and s["server_fds"] for s in report["samples"])
