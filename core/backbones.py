"""CNN backbones by name: `smallcnn` (default on CPU), torchvision `resnet18` and `resnet50`.

Every backbone maps images (n, 3, H, W) in [0, 1] to features (n, out_features) and can also
return its intermediate activations (for LID and feature-consistency detectors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.registry import Registry

BACKBONES: Registry["Backbone"] = Registry("backbone")


class Backbone(nn.Module):
    """Base: `stages` run in order; `forward_features` returns the final features and each stage's output."""

    out_features: int
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def stage_list(self) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(features (n, out_features), [stage outputs])."""
        h = self.normalize(x)
        inter = []
        for stage in self.stage_list():
            h = stage(h)
            inter.append(h)
        return self.head(h), inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(Backbone):
    """Three conv blocks (16-32-64 channels, each pooled) and a 256-unit layer: a few thousand images/s on 2 CPU cores at 32x32."""

    def __init__(self, width: int = 16, image_size: int = 32) -> None:
        super().__init__()
        w = width
        self.s1 = nn.Sequential(_conv(3, w), nn.MaxPool2d(2))
        self.s2 = nn.Sequential(_conv(w, 2 * w), nn.MaxPool2d(2))
        self.s3 = nn.Sequential(_conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4))
        self.fc = nn.Sequential(nn.Flatten(1), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True))
        self.out_features = 256

    def stage_list(self) -> list[nn.Module]:
        return [self.s1, self.s2, self.s3, self.fc]


class TorchvisionResNet(Backbone):
    """A torchvision ResNet without its classifier; weights from a local file or random init."""

    def __init__(self, arch: str, weights_path: str | Path | None = None) -> None:
        super().__init__(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights not found at {path}")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            net.load_state_dict(state, strict=False)
        self.out_features = net.fc.in_features
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.pool = net.avgpool

    def stage_list(self) -> list[nn.Module]:
        return [self.stem, *self.layers]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(x), 1)


@BACKBONES.register("smallcnn")
def smallcnn(weights_path=None, **kw) -> Backbone:
    return SmallCNN(**kw)


@BACKBONES.register("resnet18")
def resnet18(weights_path=None, **_) -> Backbone:
    return TorchvisionResNet("resnet18", weights_path)


@BACKBONES.register("resnet50")
def resnet50(weights_path=None, **_) -> Backbone:
    return TorchvisionResNet("resnet50", weights_path)


def create_backbone(name: str, weights_path: str | Path | None = None, **kw) -> Backbone:
    return BACKBONES.get(name)(weights_path=weights_path, **kw)
