"""Run the service on uvicorn: the port is taken first, then the model is loaded once, then the
port opens for requests."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from pathlib import Path

from skinlesion.core.errors import AddressError
from skinlesion.serving.settings import ServeSettings

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one), not yet listening: the
    port is held, and a client is refused rather than kept waiting until the service accepts.
    Raise :class:`AddressError` naming host and port when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise AddressError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    try:
        # As uvicorn does: a restart is not refused for the old connections in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        why = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            why = "the port is in use (another server? choose another port)"
        raise AddressError(f"cannot listen on {host}:{port}: {why}") from err
    return sock


def serve(
    model: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    device: str = "auto",
    backend: str = "auto",
) -> None:
    """Load ``model`` (see :func:`resolve_model`) and serve it until interrupted. The address is
    checked before the model loads: a port in use fails in a second, not after the loading."""
    with bind(host, port) as sock:
        # Imported once the port is ours: torch and the app take seconds to import.
        import uvicorn

        from skinlesion.core.runtime import resolve_runtime
        from skinlesion.inference.resolve import resolve_model
        from skinlesion.serving.app import create_app

        loaded = resolve_model(model, resolve_runtime(device), backend)
        app = create_app(loaded, settings)
        port = sock.getsockname()[1]
        log.info(
            "serving %s (version %s, backend %s) on http://%s:%d",
            *(loaded.name, loaded.version, loaded.backend, f"[{host}]" if ":" in host else host),
            port,
        )
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        # Ctrl-C ends the service (uvicorn shuts down gracefully, then re-raises the signal).
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
