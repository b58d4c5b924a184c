"""The Docker images, compose file and Grafana dashboard, checked without a container engine (none is reachable
on the project's machines): each Dockerfile is replayed instead of built. Its COPY sources are copied, exactly as
listed, into an empty directory laid out as the image's WORKDIR; the package is then built from that directory
alone (a wheel, as its `pip install` step would) and must hold every module and data file of the repository's
packages; every command, console script, subcommand, model name and STEERSERVE_* variable the file names must
resolve. The compose file's mounts, secrets and build files must exist, and every metric the dashboard queries
must be on /metrics of the running server with the labels the query uses. What this cannot check (base images,
apt and PyPI at build time, a GPU) is listed in docs/deployment.md."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from steerserve.server.http.metrics import Metrics
from steerserve.server.models.store import KNOWN_MODELS
from steerserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
PACKAGES = {"server": "steerserve/server", "steering": "steerserve/steering", "kernels": "steerserve/kernels"}


@dataclass
class Stage:
    name: str
    base: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (instruction, arguments)

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.steps if ins == instruction]


def parse(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(words[2] if len(words) > 2 and words[1].upper() == "AS" else str(len(stages)),
                                words[0]))
        elif instruction != "ARG" or stages:
            assert stages, f"{path.name}: {instruction} before FROM"
            stages[-1].steps.append((instruction, args))
    return stages


def copy_args(args: str) -> tuple[dict[str, str], list[str], str]:
    words = shlex.split(args)
    flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def ignored(path: str) -> bool:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or path.split("/")[0] == p for p in patterns)


def replay(stage: Stage, into: Path) -> Path:
    """The files the stage's COPY steps (from the build context) put under its WORKDIR, in `into`."""
    workdir = into
    for instruction, args in stage.steps:
        if instruction == "WORKDIR":
            workdir = into / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        if instruction != "COPY" or "from" in copy_args(args)[0]:
            continue
        _, sources, dest = copy_args(args)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
            target = workdir / dest / Path(source).name if dest.endswith("/") else workdir / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target)
    return workdir


def repository_files() -> set[str]:
    """Every file the installed package must carry: the packages' modules and data, as paths in a wheel."""
    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    return {PACKAGES[p.split("/")[0]] + p[len(p.split("/")[0]):] for p in tracked}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_replays_from_its_own_copy_steps(dockerfile: Path, tmp_path: Path):
    stages = parse(dockerfile)
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    workdir = replay(build, tmp_path / "fs")

    # Its pip install: the package builds from the copied files alone and holds every module and data file.
    installs = [a for a in build.all("RUN") if "pip install" in a]
    assert installs, "the build stage installs the package"
    extras = re.findall(r'pip install "\.\[(\w+)\]"', " ".join(installs))
    assert extras, "the package is installed from the copied sources with one extra"
    assert all(e in ("cpu", "gpu") for e in extras), "runtime dependencies only (no dev tools in the image)"
    pyproject = (workdir / "pyproject.toml").read_text()
    assert all(f"\n{e} = [" in pyproject for e in extras)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(workdir)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("steerserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(repository_files() - names)
    assert missing == [], f"the image's package would lack these files: {missing}"
    assert "steerserve" in ZipText(wheel).entry_points(), "the `steerserve` console script"

    # Every command the build runs resolves: make targets (none needed), the model it bakes in.
    for run in build.all("RUN"):
        for target in re.findall(r"\bmake\s+([\w-]+)", run):
            subprocess.run(["make", "-n", target], cwd=workdir, check=True, capture_output=True)
        for model in re.findall(r"models fetch (\S+)", run):
            assert model in KNOWN_MODELS, model

    # The runtime stage: unprivileged, healthchecked on /ready, and every path it copies made by the build stage.
    users = runtime.all("USER")
    assert users and users[-1] not in ("root", "0"), "the server does not run as root"
    assert any("/ready" in h for h in runtime.all("HEALTHCHECK")), "HEALTHCHECK on /ready"
    for args in runtime.all("COPY"):
        flags, sources, _ = copy_args(args)
        assert flags.get("from") == build.name, args
        assert all(s in " ".join(a for _, a in build.steps) for s in sources), f"{args}: not made by {build.name}"
    env = " ".join(runtime.all("ENV") + build.all("ENV"))
    fields = Settings.model_fields
    for name in re.findall(r"STEERSERVE_(\w+)=", env):
        assert name.lower() in fields, f"STEERSERVE_{name} is not a setting"
    entry = json.loads(runtime.all("ENTRYPOINT")[-1])
    assert entry[0] == "steerserve" and entry[1] == "serve"
    help_text = subprocess.run([sys.executable, "-m", "steerserve.server", "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--model" in help_text


class ZipText:
    def __init__(self, wheel: Path):
        self.zip = zipfile.ZipFile(wheel)

    def entry_points(self) -> str:
        name = next(n for n in self.zip.namelist() if n.endswith(".dist-info/entry_points.txt"))
        return self.zip.read(name).decode()


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_files_exist_and_prometheus_scrapes_with_its_secret():
    c = compose()
    assert {"steerserve", "prometheus", "grafana"} <= set(c["services"])
    build = c["services"]["steerserve"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    for service in c["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), volume
    for secret in c["secrets"].values():  # made per deployment, never committed
        assert Path(secret["file"]).parent == Path("secrets") and (DOCKER / "secrets" / ".gitignore").is_file()
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    secret = Path(job["authorization"]["credentials_file"]).name
    assert secret in c["services"]["prometheus"]["secrets"]
    assert job["static_configs"][0]["targets"] == ["steerserve:8000"]


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "steerserve.json").read_text())


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    c = compose()
    mounts = dict(v.split(":")[:2] for v in c["services"]["grafana"]["volumes"])
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/steerserve.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./grafana/dashboards"]
    source = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in dashboard()["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


SUFFIXES = {"counter": ("",),  # text format: a counter's TYPE line already ends in _total
            "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "unknown": ("",)}


def queried() -> dict[str, set[str]]:
    """Each metric the dashboard queries, with the label names its queries use on it."""
    out: dict[str, set[str]] = {}
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            by = set(re.findall(r"by \(([^)]*)\)", expr))
            grouped = {label.strip() for group in by for label in group.split(",")} - {"le"}
            for name, selector in re.findall(r"\b((?:steerserve|vllm)_[a-z_:]+)(\{[^}]*\})?", expr):
                labels = set(re.findall(r"(\w+)=", selector or ""))
                out.setdefault(name, set()).update(labels | (grouped if "(" in expr else set()))
    return out


def test_every_metric_the_dashboard_queries_is_on_metrics_of_a_running_server(server, api_keys):
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {api_keys['ops']}"},
                     timeout=30).text
    exposed = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        for suffix in SUFFIXES[kind]:
            exposed[name + suffix] = name
    labels = {c._name: set(c._labelnames) for c in Metrics().registry._collector_to_names if hasattr(c, "_labelnames")}
    for metric, used in queried().items():
        assert metric in exposed, f"the dashboard queries {metric}, which /metrics does not have"
        family = exposed[metric].removesuffix("_total")
        if family in labels:
            assert used <= labels[family] | {"le"}, f"{metric}: labels {used - labels[family]} do not exist"
