"""Run the service on uvicorn: the model is loaded once, before the port opens."""

from __future__ import annotations

import logging
from pathlib import Path

from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.packaged import resolve_model
from skinlesion.serving.app import ServeSettings, create_app

log = logging.getLogger(__name__)


def serve(
    model: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    device: str = "auto",
    backend: str = "auto",
) -> None:
    """Load ``model`` (see :func:`resolve_model`) and serve it until interrupted."""
    import uvicorn

    loaded = resolve_model(model, resolve_runtime(device), backend)
    app = create_app(loaded, settings)
    log.info(
        "serving %s (version %s, backend %s) on http://%s:%d",
        *(loaded.name, loaded.version, loaded.backend, host, port),
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
