"""The service's settings: upload limits and micro-batching. Apart from the app, so the command
line can make them (and check the port) before the app's heavy imports load."""

from __future__ import annotations

from dataclasses import dataclass, field

from skinlesion.serving.uploads import UploadLimits


@dataclass(frozen=True)
class ServeSettings:
    """Upload limits and micro-batching of the service."""

    limits: UploadLimits = field(default_factory=UploadLimits)
    max_batch: int = 32
    max_wait_ms: float = 5.0
