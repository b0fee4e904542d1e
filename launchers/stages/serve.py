"""`derl serve`: the snapshot online, a long-lived HTTP service (docs/serving.md).

    derl serve --snapshots SNAP --ranker RANKER_RUN [--host 127.0.0.1] [--port 8080]
        [--user-store embedded|redis://HOST:PORT] [--refresh-every 5] [--max-in-flight 64]

User vectors from the snapshot (or Redis), ads from its faiss index, the ranker scoring with
the snapshot's vectors joined as in training; LATEST followed under load. The service is
`launchers/runtime/serving.py`, its HTTP `serving_app.py`, run here by uvicorn until stopped
(Ctrl-C, or SIGTERM: both end it after the requests in flight, unpinning its version).
"""

from __future__ import annotations

import signal
import socket
import sys

from derl.launchers.runtime import serving
from derl.launchers.runtime.settings import ServeConfig


def validate(cfg: ServeConfig) -> None:
    """Before the model loads: a finished snapshot ranker, a snapshot root with a LATEST."""
    serving.require_servable(cfg)


def run(cfg: ServeConfig) -> None:
    import uvicorn

    from derl.launchers.runtime.serving_app import build_app

    listening = _listen(cfg.host, cfg.port)  # before the model loads: a port in use fails at once
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped, not failed (uvicorn drains first)
    service = serving.Service(cfg)
    try:
        health = service.health()
        print(f"derl serve: version {health['version']} of {cfg.snapshots} (cut {health['cut_day']}), ranker "
              f"{cfg.ranker}, user vectors {health['user_store']}; on http://{cfg.host}:{cfg.port}", flush=True)
        uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning", access_log=False,
                                      timeout_keep_alive=30)).run(sockets=[listening])
    finally:
        service.close()  # done already where the app's lifespan ended; not where uvicorn never started it


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock
