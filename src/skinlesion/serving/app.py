"""The HTTP service: one loaded model behind ``POST /predict``, with the web page at ``/``.

Every answer's probabilities are those of ``skinlesion predict`` for the same image: the upload is
prepared by the same function, and a micro-batcher feeds the model's same ``outputs`` (the
probabilities and the unfamiliarity of one forward pass), whatever the model is (a
:class:`~skinlesion.inference.resolve.Predictor`: a fold ensemble, or an export folder's graph,
which has no Grad-CAM: ``?explain=true`` then answers ``explanation: null`` and why). Errors are
JSON ``{"error": message, "status": code}``; a request can only send image bytes, never a path.
Optional form fields ``age``, ``sex`` and ``localization`` reach a model fused with patient
metadata (each may be left out); an image-only model ignores them and says so.

Example::

    app = create_app(resolve_model("runs/quick"), ServeSettings(max_wait_ms=5))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from skinlesion.core.labels import MELANOMA
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.preprocess import ImageDecodeError, prepare_with_spec
from skinlesion.data.tabular import AGE_MAX, METADATA_FIELDS, age_problem, normalise_category
from skinlesion.inference.explain import MODEL_LOCK, explain_images
from skinlesion.inference.packaged import LoadedModel
from skinlesion.inference.resolve import Predictor
from skinlesion.inference.table import Decisions, prediction_rows
from skinlesion.serving.batcher import MicroBatcher
from skinlesion.serving.settings import ServeSettings
from skinlesion.serving.uploads import UploadError, UploadLimits, check_upload

log = logging.getLogger(__name__)

# Room for the multipart envelope around the image bytes.
_MULTIPART_SLACK = 64 * 1024
# The micro-batcher's key for an item's raw metadata (age, sex, localization; None = missing).
METADATA_KEY = "metadata"
NO_GRAD_CAM = (
    "Grad-CAM needs the PyTorch weights, which an ONNX export does not hold; serve the model "
    "it was exported from for overlays"
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def describe(
    model: Predictor,
    probs: np.ndarray,
    image: str,
    decisions: Decisions,
    unfamiliarity: float | None = None,
) -> dict[str, Any]:
    """The JSON answer for one image's calibrated probabilities (and unfamiliarity, ``None``
    for a model without familiarity): the predictions table's row (:func:`prediction_rows`, the
    same keys; the class probabilities under ``probabilities``), with ``confidence``, the
    ``melanoma`` decision spelled out and the model's name."""
    u = None if unfamiliarity is None else np.array([unfamiliarity])
    (row,) = prediction_rows([image], probs[None], {}, decisions, u)
    names = list(decisions.classes)
    answer: dict[str, Any] = {k: v for k, v in row.items() if k not in names}
    answer["probabilities"] = {c: row[c] for c in names}
    answer["confidence"] = float(np.max(probs))
    answer["melanoma"] = None
    if row["melanoma_flag"] is not None:
        answer["melanoma"] = {
            "probability": row[MELANOMA],
            "threshold": decisions.mel_threshold,
            "flag": row["melanoma_flag"],
        }
    answer["model"] = {"name": model.name, "version": model.version}
    return answer


def metadata_used(model: Predictor, given: dict[str, Any]) -> dict[str, Any] | None:
    """The form fields a fused model got (``None`` for an image-only model); a value it never
    saw in training is reported as such (it encodes as ``unknown``)."""
    if not model.uses_metadata:
        return None
    used = {k: v for k, v in given.items() if v is not None}
    row = pd.DataFrame([used], columns=list(METADATA_FIELDS))
    for fld in model.unseen_metadata(row, None):
        used[fld] = f"{used[fld]} (never seen in training: read as unknown)"
    return used


def _png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _prepare(model: Predictor, data: bytes, limits: UploadLimits) -> dict[Any, np.ndarray]:
    check_upload(data, limits)
    return {s: prepare_with_spec(data, s) for s in model.specs}


def _batch_fn(model: Predictor, max_batch: int) -> Any:
    """The micro-batcher's function: stacked images (and raw metadata rows) -> one
    ``(probabilities, unfamiliarity or None)`` per image."""

    def run(stacked: dict[Any, np.ndarray]) -> list[tuple[np.ndarray, float | None]]:
        images = {k: v for k, v in stacked.items() if k != METADATA_KEY}
        meta = stacked.get(METADATA_KEY)
        table = None if meta is None else pd.DataFrame(meta, columns=list(METADATA_FIELDS))
        probs, u = model.outputs(images, model.tta, max_batch, table)
        values = [None] * len(probs) if u is None else [float(v) for v in u]
        return list(zip(probs, values, strict=True))

    return run


def _metadata_row(model: Predictor, values: dict[str, Any]) -> np.ndarray | None:
    """One item's raw metadata for a fused model (every item of a batch has the key, so they
    stack); ``None`` for an image-only model."""
    if not model.uses_metadata:
        return None
    return np.array([values.get(f) for f in METADATA_FIELDS], dtype=object)


def _static(name: str) -> str:
    return (resources.files("skinlesion.serving") / "static" / name).read_text("utf-8")


def _card_summary(model: Predictor) -> dict[str, Any]:
    card = model.card or {}
    return {
        "name": model.name,
        "version": model.version,
        "intended_use": card.get(
            "intended_use",
            "Research and education only. Not a medical device and not for diagnosis.",
        ),
        "known_limits": card.get("known_limits", []),
        "classes": model.class_names,
        "card": card or None,
        "reference": model.reference,
        "metadata": model.metadata_inputs,
    }


def _new_app(model: Predictor, batcher: MicroBatcher) -> FastAPI:
    """The bare app, whose lifespan starts and stops the micro-batcher."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    return FastAPI(
        title="skinlesion",
        version=model.version or "0",
        summary="Calibrated dermoscopic lesion classification for research and teaching; "
        "not a medical device.",
        lifespan=lifespan,
    )


def _add_info_routes(app: FastAPI, model: Predictor, batcher: MicroBatcher) -> None:
    """The web page (and its icon), ``/health`` (with the batches served) and ``/model`` (the
    card)."""
    started = time.time()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return _static("index.html")

    # Browsers ask for /favicon.ico whatever the page links; one small SVG answers both.
    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(_static("favicon.svg"), media_type="image/svg+xml")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model.name,
            "version": model.version,
            "uptime_s": round(time.time() - started, 1),
            "batches": batcher.batches,
            "images": batcher.images,
        }

    @app.get("/model")
    async def model_card() -> dict[str, Any]:
        return _card_summary(model)


def _explainer(model: Predictor) -> Callable[[bytes], dict[str, Any]] | None:
    """One upload -> its ``explanation`` (Grad-CAM overlay, base64 PNG); ``None`` for a model
    without PyTorch weights (an export folder), logged once."""
    if not isinstance(model, LoadedModel):
        log.info("%s: ?explain=true answers no overlay: %s", model.origin, NO_GRAD_CAM)
        return None
    runtime = model.runtime or resolve_runtime("auto")

    def explain(data: bytes) -> dict[str, Any]:
        (ex,) = explain_images([data], model.members, runtime, model.tta)
        return {
            "class_explained": ex.class_name,
            "method": "Grad-CAM, last convolutional stage, mean over fold models",
            "overlay_png_base64": _png_base64(ex.overlay),
        }

    return explain


def create_app(model: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (loaded once, shared by every request)."""
    settings = settings or ServeSettings()
    explainer = _explainer(model)
    batcher = MicroBatcher(
        _batch_fn(model, settings.max_batch),
        settings.max_batch,
        settings.max_wait_ms,
        lock=MODEL_LOCK,
    )
    decisions = model.decisions()
    app = _new_app(model, batcher)
    _add_error_handlers(app)
    _add_body_limit(app, settings.limits.max_bytes)
    _add_info_routes(app, model, batcher)

    @app.post("/predict")
    async def predict(
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, ...)")],
        explain: Annotated[bool, Query(description="add a Grad-CAM overlay (PNG, base64)")] = False,
        age: Annotated[float | None, Form(ge=0, le=AGE_MAX, description="years")] = None,
        sex: Annotated[str | None, Form(max_length=32)] = None,
        localization: Annotated[str | None, Form(max_length=64, description="site")] = None,
    ) -> JSONResponse:
        data = await file.read(settings.limits.max_bytes + 1)
        try:
            arrays = await run_in_threadpool(_prepare, model, data, settings.limits)
        except UploadError as err:
            return _error(err.status, str(err))
        except ImageDecodeError as err:
            return _error(422, f"the image cannot be decoded: {str(err).removeprefix('<bytes>: ')}")
        given = {"age": age, "sex": sex, "localization": localization}
        meta = _metadata_row(model, given)
        if meta is not None:
            arrays[METADATA_KEY] = meta
        probs, unfamiliarity = await asyncio.wrap_future(batcher.submit(arrays))
        answer = describe(model, probs, file.filename or "<upload>", decisions, unfamiliarity)
        answer["metadata_used"] = metadata_used(model, given)
        if explain and explainer is None:
            answer["explanation"], answer["explanation_unavailable"] = None, NO_GRAD_CAM
        elif explain:
            answer["explanation"] = await run_in_threadpool(explainer, data)
        return JSONResponse(answer)

    return app


def _add_body_limit(app: FastAPI, max_bytes: int) -> None:
    max_body = max_bytes + _MULTIPART_SLACK

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        # Refuse an over-size body from its header, before the multipart parser stores it.
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "Content-Length header required")
            if not length.isdigit() or int(length) > max_body:
                return _error(
                    413,
                    f"request body of {length} bytes is over the limit of {max_bytes} bytes "
                    "of image",
                )
        return await call_next(request)


def _field_problem(error: dict[str, Any]) -> str | None:
    """What is wrong with a form field or query parameter other than ``file``, in words;
    ``None`` for the image field or a malformed body (the caller then says how to send the
    image)."""
    loc = [str(x) for x in error.get("loc", ())]
    if len(loc) < 2 or loc[0] not in ("body", "query") or loc[1] == "file":
        return None
    kind, name = ("form field" if loc[0] == "body" else "query parameter"), loc[1]
    why = _age_field_problem(error.get("input")) if name == "age" else None
    return f"{kind} '{name}': {why or error.get('msg', 'invalid value')}"


def _age_field_problem(value: Any) -> str | None:
    """Why a form's ``age`` was refused. The words a table reads as a missing age (``nan``,
    ``unknown``) are no number here: a form leaves an unknown age out."""
    why = age_problem(value)
    if why is None and normalise_category(value) is None and value is not None:
        text = str(value).strip()
        why = f"age {text!r} is not a number; leave the field empty when the age is unknown"
    return why


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems, rest = [], []
        for e in err.errors():
            why = _field_problem(e)
            if why:
                problems.append(why)
            else:
                rest.append(e)
        if rest or not problems:
            named = sorted({".".join(str(x) for x in e.get("loc", ())[1:]) for e in rest})
            problems.append(
                "send the image as the multipart field 'file' "
                f"(problem with: {', '.join(f for f in named if f) or 'the body'})"
            )
        return _error(422, "invalid request: " + "; ".join(dict.fromkeys(problems)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))
