"""Image + patient-metadata fusion: a small MLP on the metadata vector, its output joined with
the image embedding before the classifier.

This follows the design of the ISIC 2019 challenge winner: Gessert, N., Nielsen, M., Shaikh,
M., Werner, R., Schlaefer, A. "Skin lesion classification using ensembles of multi-resolution
EfficientNets with meta data", MethodsX 7:100864 (2020). There, the metadata (age, sex,
anatomical site, one-hot) passes two dense layers with batch normalisation, ReLU and dropout,
and is concatenated with the CNN's pooled features before the last layer.

The timm backbone keeps its own layout under ``backbone.`` (its classifier replaced by an
identity); ``forward_features``/``forward_head``/``get_classifier`` keep timm's meaning, so
Grad-CAM, the linear probe's shared-backbone shortcut and ONNX export see a familiar model. A
call without metadata uses the stored all-missing encoding, so the model also works on images
alone.
"""

from __future__ import annotations

import torch
from torch import nn


class MetadataFusion(nn.Module):
    """A timm backbone with a metadata branch; ``model(x, metadata)`` -> logits.

    ``hidden=0`` has no metadata MLP: the encoded vector is joined to the embedding as it is (a
    linear probe's head on ``[embedding, metadata]``).

    >>> import timm
    >>> m = MetadataFusion(timm.create_model("resnet10t", num_classes=3), torch.zeros(5), 16)
    >>> m(torch.zeros(2, 3, 32, 32), torch.zeros(2, 5)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self, backbone: nn.Module, missing: torch.Tensor, hidden: int = 128, dropout: float = 0.3
    ) -> None:
        super().__init__()
        self.num_classes = backbone.num_classes
        self.num_features = backbone.num_features
        meta_dim = int(missing.numel())
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.register_buffer("missing", missing.detach().float().reshape(-1).clone())
        if hidden > 0:
            self.meta: nn.Module = nn.Sequential(
                nn.Linear(meta_dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.SiLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.BatchNorm1d(hidden),
                nn.SiLU(),
                nn.Dropout(dropout),
            )
            meta_out = hidden
        else:
            self.meta = nn.Identity()
            meta_out = meta_dim
        self.classifier = nn.Linear(self.num_features + meta_out, self.num_classes)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    @property
    def meta_dim(self) -> int:
        return int(self.missing.numel())

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def metadata_or_missing(self, metadata: torch.Tensor | None, n: int) -> torch.Tensor:
        """``metadata`` on the model's device, or the all-missing encoding for ``n`` rows."""
        if metadata is None:
            return self.missing.expand(n, -1)
        return metadata.to(self.missing.device, self.missing.dtype)

    def forward_head(
        self,
        features: torch.Tensor,
        pre_logits: bool = False,
        metadata: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits; ``pre_logits=True`` gives the image embedding alone (shared by all metadata)."""
        emb = self.backbone.forward_head(features, pre_logits=True)
        if pre_logits:
            return emb
        return self.head(emb, metadata)

    def head(self, emb: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from an image embedding and the metadata (``None``: all missing)."""
        m = self.meta(self.metadata_or_missing(metadata, emb.shape[0]).to(emb.dtype))
        return self.classifier(torch.cat([emb, m.to(emb.dtype)], dim=1))

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), metadata=metadata)


def drop_metadata(
    metadata: torch.Tensor, missing: torch.Tensor, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Replace each row by the all-missing encoding with probability ``p`` (whole vector), so the
    model learns to classify without metadata too."""
    if p <= 0:
        return metadata
    drop = torch.rand(metadata.shape[0], generator=generator) < p
    drop = drop.to(metadata.device).unsqueeze(1)
    return torch.where(drop, missing.to(metadata.device, metadata.dtype), metadata)
