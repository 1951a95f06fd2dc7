"""Shared test fixtures: the optional real HAM10000 copy beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

# ``../shared`` beside the repository root: read-only, and absent on some machines.
HAM_DIR = Path(__file__).parents[2] / "shared" / "data" / "ham10000"
HAM_METADATA = HAM_DIR / "HAM10000_metadata.csv"

requires_ham = pytest.mark.skipif(
    not HAM_METADATA.is_file(), reason=f"real HAM10000 not found at {HAM_DIR}"
)
"""Mark for tests that read the real data; they skip cleanly where it is absent."""


@pytest.fixture
def ham_dir() -> Path:
    """The real HAM10000 folder; skips the test when it (or its metadata) is absent."""
    if not HAM_METADATA.is_file():
        pytest.skip(f"real HAM10000 not found at {HAM_DIR}")
    return HAM_DIR


def make_tiny_packaged(
    root: Path, name: str = "tiny", members: int = 2, size: int = 48, tta: int = 2, seed: int = 0
) -> Path:
    """A packaged model folder of random ``test_efficientnet`` members (no training): distinct
    classifier weights and temperatures per member, a reference with refer rules and a card."""
    import json

    import torch

    from skinlesion.inference.packaged import (
        CARD_FILE,
        MODEL_FILE,
        PACKAGED_FORMAT,
        WEIGHTS_FILE,
        sha256_file,
    )
    from skinlesion.models.factory import build_model, default_spec
    from skinlesion.training.package import INTENDED_USE, KNOWN_LIMITS, write_weights

    spec = default_spec("test_efficientnet", size)
    gen = torch.Generator().manual_seed(seed)
    ckpts = []
    for fold in range(members):
        torch.manual_seed(seed + fold)
        model = build_model("test_efficientnet", len(spec.class_names), pretrained=False)
        clf = model.get_classifier()
        with torch.no_grad():
            clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) * 0.5)
            clf.bias.copy_(torch.randn(clf.bias.shape, generator=gen))
        ckpts.append({"fold": fold, "state_dict": model.state_dict()})
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    write_weights(ckpts, out / WEIGHTS_FILE)
    refer = {"confidence_threshold": 0.2, "ood_threshold": 1.9, "ood_quantile": 0.95}
    meta = {
        "format": PACKAGED_FORMAT,
        "format_version": 1,
        "name": name,
        "version": "0.0-test",
        "backbone": "test_efficientnet",
        "model_kwargs": {},
        "preprocessing": spec.to_dict(),
        "class_names": list(spec.class_names),
        "tta": tta,
        "members": [
            {"fold": c["fold"], "prefix": f"fold{c['fold']}.", "temperature": 1.0 + 0.5 * i}
            for i, c in enumerate(ckpts)
        ],
        "reference": {
            "mel_threshold": 0.15,
            "domain": {"confidence_threshold": 0.2},
            "refer": refer,
        },
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
    }
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    card = {"name": name, "intended_use": INTENDED_USE, "known_limits": KNOWN_LIMITS}
    (out / CARD_FILE).write_text(json.dumps(card))
    return out


@pytest.fixture(scope="session")
def tiny_packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packaged two-member model (48 px, TTA 2) of random weights, built once per session."""
    return make_tiny_packaged(tmp_path_factory.mktemp("tiny_zoo"))


def lesion_images(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    """``n`` real HAM10000 images when the shared copy is present, else synthetic lesions."""
    if HAM_DIR.is_dir():
        found = sorted((HAM_DIR / "HAM10000_images_part_1").glob("*.jpg"))[:n]
        if len(found) == n:
            return found
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        arr = rng.integers(150, 230, (150, 200, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        x, y = int(rng.integers(40, 120)), int(rng.integers(30, 80))
        ImageDraw.Draw(img).ellipse((x, y, x + 50, y + 40), fill=(90, 50, 40))
        out.append(folder / f"synthetic_{i}.jpg")
        img.save(out[-1], quality=92)
    return out


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a few dozen bytes that would
    decode into a huge image (the shape of a decompression bomb)."""

    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bytes(w: int = 40, h: int = 30) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 80, 60)).save(buf, format="PNG")
    return buf.getvalue()
