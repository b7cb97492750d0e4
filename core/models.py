"""CSQ deep-hashing model: backbone + linear hash layer + tanh; codes are sign(f(x))."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.backbones import create_backbone

VALID_BITS = (16, 32, 48, 64, 128)


class CSQModel(nn.Module):
    """f(x): images (n, 3, H, W) in [0, 1] -> continuous codes (n, K) in (-1, 1)."""

    def __init__(self, backbone: str = "smallcnn", bits: int = 64, weights_path=None) -> None:
        super().__init__()
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8 (FAISS binary codes), got {bits}")
        self.backbone_name = backbone
        self.bits = bits
        self.backbone = create_backbone(backbone, weights_path)
        self.hash_layer = nn.Linear(self.backbone.out_features, bits)
        # Convolution weights channels-last: oneDNN's convolutions then run NHWC, which on the development
        # CPU halves the small CNN's time per image from 2 images a pass up (and changes no code: outputs
        # agree to ~4e-7). Loading a state dict copies into these tensors and keeps their layout.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hash_layer(self.backbone(x)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(f(x) (n, K), [intermediate activations of each backbone stage])."""
        feats, inter = self.backbone.forward_features(x)
        return torch.tanh(self.hash_layer(feats)), inter


def create_model(backbone: str = "smallcnn", bits: int = 64, weights_path=None) -> CSQModel:
    return CSQModel(backbone, bits, weights_path)


def sign_codes(f):
    """h = sign(f) with sign(0) = +1: (n, K) in {-1, +1}, in f's dtype; a tensor for a tensor, a NumPy array
    for an array (the detector's host path, where one NumPy call beats three torch ops at batch size 1)."""
    if isinstance(f, np.ndarray):
        return np.where(f >= 0, f.dtype.type(1), f.dtype.type(-1))
    return torch.where(f >= 0, 1.0, -1.0).to(f.dtype)


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
    """Continuous outputs f(x) (n, K) on the CPU, computed in batches in eval mode."""
    model.eval()
    device = device or next(model.parameters()).device
    outs = [model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, getattr(model, "bits", 0))
