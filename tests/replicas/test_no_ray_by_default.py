"""Without --replicas nothing of Ray is imported: the CLI parsing and the whole single-process app, read in a
fresh interpreter (a second or two; no engine)."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
from steerserve.server.cli import serve as serve_cli
import argparse
parser = argparse.ArgumentParser(); commands = parser.add_subparsers(dest="command")
serve_cli.add_parser(commands)
chosen = []
serve_cli.serve_forever = lambda settings: chosen.append(settings) or 0
assert serve_cli.run(parser.parse_args(["serve", "--port", "0"])) == 0 and chosen[0].replicas is None
import steerserve.server.http.app, steerserve.server.cli.app_from_settings, steerserve.server.replicas.forwarding
import steerserve.server.replicas.metrics_merge
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""


def test_the_single_process_imports_no_ray():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_replicas_flag_goes_to_ray_serve():
    from steerserve.server.cli import main
    from steerserve.server.replicas import launch

    seen = []
    original = launch.serve_replicas
    launch.serve_replicas = lambda settings: seen.append(settings) or 0
    try:
        assert main(["serve", "--replicas", "3", "--replica-cpus", "0.5", "--port", "0"]) == 0
    finally:
        launch.serve_replicas = original
    assert seen[0].replicas == 3 and seen[0].replica_cpus == 0.5
