"""The Ray Serve config file and the KubeRay RayService manifest, which cannot run here (no cluster): parsed,
checked against the fields the RayService CRD (ray.io/v1) requires and the values it accepts, and against our
own application (its import path resolves, its args are valid settings, its deployment names exist). Seconds."""
from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from steerserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "ray-serve.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay-rayservice.yaml"
DEPLOYMENTS = {"SteerServeRouter", "SteerServeReplica"}  # server/replicas/deployment.py: build_application


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert isinstance(c["name"], str) and c["name"] and isinstance(c["image"], str) and c["image"], where
        for kind in ("requests", "limits"):
            assert set(c.get("resources", {}).get(kind, {})) <= {"cpu", "memory"}, where
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in template["spec"].get("volumes", [])}, f"{where}: mount without volume"
    return containers


def test_serve_config_builds_our_application():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert set(config) <= {"proxy_location", "http_options", "grpc_options", "logging_config", "applications"}
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    settings = Settings(**app["args"])
    assert settings.replicas == 2 and settings.host == config["http_options"]["host"]
    assert {d["name"] for d in app["deployments"]} <= DEPLOYMENTS
    assert app["route_prefix"] == "/"


def test_rayservice_has_what_the_crd_requires():
    doc = yaml.safe_load(RAYSERVICE.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # the CRD's type: a YAML document in a string
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == importlib.import_module("ray").__version__  # the Ray the extra pins
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string in the CRD
    head_ports = {p["containerPort"] for c in check_pod_template(head["template"], "head") for p in c["ports"]}
    assert {6379, 8265, 8000} <= head_ports  # GCS, the dashboard KubeRay submits serveConfigV2 to, Serve
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert isinstance(group["groupName"], str) and group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        check_pod_template(group["template"], group["groupName"])
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    worker_cpus = {float(g["rayStartParams"]["num-cpus"]) for g in cluster["workerGroupSpecs"]}
    assert worker_cpus == {float(args["replica_cpus"])}  # one engine replica fits each worker pod exactly
    assert float(head["rayStartParams"]["num-cpus"]) == 0  # the head runs no engine
