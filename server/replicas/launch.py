"""`steerserve serve --replicas N`: start (or join) Ray, Ray Serve's HTTP proxy on --host/--port, and the
application of server/replicas/deployment.py; serve until SIGTERM or SIGINT, then shut Serve down gracefully
(each replica drains for up to --shutdown-timeout) and stop the Ray it started.

Without --replicas nothing here is imported (server/cli/serve.py), so the single process never loads Ray."""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading

from ..settings import Settings

APP_NAME = "steerserve"
log = logging.getLogger("steerserve.replicas")


def start(settings: Settings) -> None:
    """Starts Ray (a local cluster sized for the replicas, or joins settings.ray_address), Serve's proxy and the
    application; returns once every replica's engine is ready (Ray Serve waits for the replicas' constructors)."""
    import ray
    from ray import serve

    from .deployment import NAMESPACE, board, build_application

    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, namespace=NAMESPACE)
        else:
            wanted = math.ceil((settings.replicas or 1) * settings.replica_cpus)
            if wanted > (os.cpu_count() or 1):
                log.warning("%d replicas x %g CPUs oversubscribe this machine's %d cores", settings.replicas,
                            settings.replica_cpus, os.cpu_count())
            ray.init(num_cpus=max(wanted, os.cpu_count() or 1), include_dashboard=False, namespace=NAMESPACE,
                     log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    board()
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)


def stop() -> None:
    """Deletes the application (replicas drain), stops Serve and, if this process started it, Ray."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_replicas(settings: Settings) -> int:
    """The CLI entry: serve until stopped; 0 after a clean stop, 1 if the application could not start."""
    from ..models.store import ModelFetchError
    from .replica_settings import prepare

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = prepare(settings)
    except (ModelFetchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()

    def on_signal(*_) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        start(settings)
    except Exception as exc:  # noqa: BLE001 - reported, then the cluster is stopped
        log.exception("the replicas could not start")
        print(f"error: the replicas could not start: {exc}", file=sys.stderr)
        stop()
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):  # again: ray.init installs its own, which aborts the process
        signal.signal(sig, on_signal)
    log.info("serving %s with %d replicas on http://%s:%d", settings.model, settings.replicas, settings.host,
             settings.port)
    stopping.wait()
    log.info("stopping: draining the replicas (up to %g s)", settings.shutdown_timeout)
    stop()
    return 0
