"""``skinlesion serve``: the HTTP service and web page for a model."""

from __future__ import annotations

import argparse

from skinlesion.cli.common import MODEL_HELP, add_backend_option


def _cmd_serve(args: argparse.Namespace) -> int:
    from skinlesion.serving.server import serve
    from skinlesion.serving.settings import ServeSettings
    from skinlesion.serving.uploads import UploadLimits

    limits = UploadLimits(int(args.max_upload_mb * 1024 * 1024), args.max_pixels)
    settings = ServeSettings(limits, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    serve(args.model, args.host, args.port, settings, device=args.device, backend=args.backend)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="HTTP service and web page for a model")
    sv.add_argument("--model", default=None, help=MODEL_HELP)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted")
    sv.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest image (width x height)"
    )
    sv.add_argument("--max-batch", type=int, default=32, help="micro-batch size")
    sv.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a micro-batch waits to fill"
    )
    sv.add_argument("--device", default="auto")
    add_backend_option(sv)
    sv.set_defaults(func=_cmd_serve)
