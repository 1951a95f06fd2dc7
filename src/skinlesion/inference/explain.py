"""Grad-CAM: where in the image the model looked for the class it explains.

Maps come from the maintained ``grad-cam`` package (pytorch-grad-cam) at the last convolutional
stage of the backbone (timm EfficientNet: ``bn2``, the activated output of ``conv_head``). A fold
ensemble's map is the mean of its members' maps, each scaled to [0, 1] first. The map is computed
on the identity view only (no TTA): the averaged views would blur positions, and the class it
explains is the ensemble's calibrated prediction with the run's TTA.

Example::

    results = explain_images(["lesion.jpg"], loaded.members, runtime)
    results[0].overlay.save("lesion_gradcam.png")
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from skinlesion.core.errors import ConfigError
from skinlesion.core.paths import check_writable_dir
from skinlesion.core.runtime import Runtime
from skinlesion.data.augment import normalize, to_float
from skinlesion.data.preprocess import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    prepare_with_spec,
)
from skinlesion.inference.predict import Member, ensemble_probs

# pytorch-grad-cam hooks the target layer for the duration of a call: one call at a time per
# process, and no other forward pass through the same model meanwhile (the server shares it).
MODEL_LOCK = threading.Lock()


@dataclass
class Explanation:
    """One image's explanation: calibrated probabilities, the class explained, its map and the
    overlay on the original image."""

    probs: np.ndarray
    class_index: int
    class_name: str
    cam: np.ndarray  # (H, W) in [0, 1], at the original image's size
    overlay: Image.Image


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage: ``bn2`` (timm EfficientNet/MobileNet), ``conv_head``, or
    else the last ``Conv2d`` of the model."""
    for name in ("bn2", "conv_head"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__}: no convolutional layer for Grad-CAM")
    return convs[-1]


def member_cams(
    member: Member, images_u8: np.ndarray, classes: Sequence[int], runtime: Runtime
) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] of one member for prepared uint8 (N, S, S, 3) images."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    spec = member.spec
    x = normalize(to_float(torch.from_numpy(images_u8).to(runtime.device)), spec.mean, spec.std)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with MODEL_LOCK, GradCAM(model=member.model, target_layers=[target_layer(member.model)]) as cam:
        maps = cam(input_tensor=x, targets=targets)
        member.model.zero_grad(set_to_none=True)  # the weights' gradients are not kept
    return np.asarray(maps, dtype=np.float32)


def ensemble_cams(
    members: Sequence[Member],
    images: dict[PreprocessSpec, np.ndarray],
    classes: Sequence[int],
    size: int,
    runtime: Runtime,
) -> np.ndarray:
    """Mean over members of their [0, 1] maps, each resized to ``size`` x ``size``."""
    total = np.zeros((len(classes), size, size), dtype=np.float64)
    for m in members:
        maps = torch.from_numpy(member_cams(m, images[m.spec], classes, runtime))
        if maps.shape[-1] != size:
            maps = torch.nn.functional.interpolate(
                maps[:, None], size=(size, size), mode="bilinear", align_corners=False
            )[:, 0]
        total += maps.double().numpy()
    return (total / len(members)).astype(np.float32)


def overlay_cam(image: Image.Image, cam: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The map in a jet colour scale blended over the RGB image (same size as the image)."""
    from matplotlib import colormaps

    heat = (colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3] * 255).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).round().astype(np.uint8))


def _to_image_size(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Preprocessing resizes the whole field of view without a crop, so a plain resize maps the
    # square map back onto the original image exactly.
    t = torch.from_numpy(cam)[None, None]
    w, h = size
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return out[0, 0].clamp(0, 1).numpy()


def explain_images(
    inputs: Sequence[str | Path | bytes | Image.Image],
    members: Sequence[Member],
    runtime: Runtime,
    tta: int | None = None,
    class_index: int | None = None,
) -> list[Explanation]:
    """Explain each image's predicted class (or ``class_index`` for all) with Grad-CAM.

    Raises :class:`ImageDecodeError` naming the first image that cannot be decoded."""
    tta = members[0].tta if tta is None else tta
    specs = list(dict.fromkeys(m.spec for m in members))
    originals = [decode_image(x) for x in inputs]
    images = {s: np.stack([prepare_with_spec(img, s) for img in originals]) for s in specs}
    with MODEL_LOCK:
        probs = ensemble_probs(members, images, runtime, tta)
    classes = [int(p.argmax()) if class_index is None else class_index for p in probs]
    cams = ensemble_cams(members, images, classes, max(s.size for s in specs), runtime)
    names = members[0].spec.class_names
    out = []
    for img, p, c, cam in zip(originals, probs, classes, cams, strict=True):
        full = _to_image_size(cam, img.size)
        out.append(Explanation(p, c, names[c], full, overlay_cam(img, full)))
    return out


def explain_to_dir(
    inputs: Sequence[str | Path],
    members: Sequence[Member],
    runtime: Runtime,
    output: Path,
    tta: int | None = None,
    class_name: str | None = None,
) -> tuple[list[dict[str, object]], dict[int, str]]:
    """Write ``<stem>_gradcam.png`` per image and ``explanations.csv`` (image, class explained,
    its probability, overlay file); a bad image is reported and the others go on. The class
    explained is each image's predicted one, or ``class_name`` for all."""
    import pandas as pd

    names = members[0].spec.class_names
    if class_name is not None and class_name not in names:
        raise ConfigError(f"--class {class_name}: not a class of this model; its classes: {names}")
    class_index = None if class_name is None else names.index(class_name)
    check_writable_dir(output, "explanations folder")
    output.mkdir(parents=True, exist_ok=True)
    rows, errors, used = [], {}, set()
    for i, src in enumerate(inputs):
        try:
            (ex,) = explain_images([src], members, runtime, tta, class_index)
        except ImageDecodeError as err:
            errors[i] = str(err)
            continue
        name = f"{Path(src).stem}_gradcam.png"
        if name in used:  # two images with the same file name from different folders
            name = f"{Path(src).stem}_{i}_gradcam.png"
        used.add(name)
        ex.overlay.save(output / name)
        rows.append(
            {
                "image": str(src),
                "class_explained": ex.class_name,
                "probability": float(ex.probs[ex.class_index]),
                "overlay": name,
            }
        )
    pd.DataFrame(rows, columns=["image", "class_explained", "probability", "overlay"]).to_csv(
        output / "explanations.csv", index=False, float_format="%.6f"
    )
    return rows, errors
