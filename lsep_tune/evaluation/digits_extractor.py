"""The ``digits`` feature extractor: a small CNN classifier for scikit-learn's 8x8 digits.

Why it exists: Inception-v3 features of 8x8 one-channel images upsampled to 299x299 say little about
digit quality, and its weights are not always available offline. This CNN is trained (by
``python -m lsep_tune.evaluation.train_digits_extractor``) on the digits *training* split only; its
128-d penultimate layer feeds FID / KID / precision-recall and its 10 logits feed the Inception
Score (so IS here is bounded by 10, the number of classes).

Digits FID is a *domain* FID: distances are measured in this CNN's feature space, so the numbers are
only comparable with other digits-FID numbers computed with the same weights. They are not on the
scale of, and must never be compared with, ImageNet FID from Inception-v3.
"""
from __future__ import annotations

import io
from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert

FEATURE_LAYER = "penultimate"
LOGITS_LAYER = "logits"
FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SIZE = 8
WEIGHTS_RESOURCE = "weights/digits_cnn.pt"


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers, two 2x2 max-pools, a 128-d ReLU feature layer and a 10-way head."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.fc = nn.Linear(128 * 2 * 2, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float (N, 1, 8, 8) in [-1, 1]. Returns (penultimate features, logits)."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4 -> 2x2
        feats = F.relu(self.fc(torch.flatten(x, 1)))
        return feats, self.head(self.dropout(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def uint8_to_model_space(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the inverse of ``lsep_tune.data.digits.to_uint8``."""
    return x.to(torch.float32) / 127.5 - 1.0


def shipped_weights_bytes() -> bytes:
    """The weights file shipped inside the package (read as a resource so zipped installs work)."""
    return (resources.files("lsep_tune.evaluation") / WEIGHTS_RESOURCE).read_bytes()


def load_digits_cnn(weights: str | bytes | io.IOBase | None = None) -> DigitsCNN:
    """Build the CNN in eval mode with weights from a path, raw bytes, a file object, or the package."""
    if weights is None:
        weights = shipped_weights_bytes()
    if isinstance(weights, (bytes, bytearray)):
        weights = io.BytesIO(weights)
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    model = DigitsCNN()
    model.load_state_dict(state_dict)
    model.requires_grad_(False)
    return model.eval()


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of :class:`DigitsCNN`, registered as ``digits``.

    Accepts uint8 (N, 1, 8, 8) tensors; (N, 3, 8, 8) tensors, as torch-fidelity's image-folder
    loader produces, are averaged to one channel first.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = load_digits_cnn(feature_extractor_weights_path)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(
            x.dim() == 4 and x.shape[1] in (1, 3) and tuple(x.shape[2:]) == (IMAGE_SIZE, IMAGE_SIZE),
            f"Input is not Bx1x8x8 (or Bx3x8x8): {tuple(x.shape)}",
        )
        x = uint8_to_model_space(x)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        feats, logits = self.model.features_and_logits(x)
        out = {FEATURE_LAYER: feats, LOGITS_LAYER: logits}
        return tuple(out[name].to(torch.float32) for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return FEATURE_LAYER, LOGITS_LAYER

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": LOGITS_LAYER, "fid": FEATURE_LAYER, "kid": FEATURE_LAYER, "prc": FEATURE_LAYER}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
