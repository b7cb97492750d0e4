"""Checkpoints: safetensors weights plus JSON metadata; loading never unpickles anything."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.models import CSQModel


@dataclass
class CheckpointMeta:
    """What a checkpoint was trained as and how well it retrieves."""

    backbone: str
    bits: int
    dataset: str
    split_seed: int
    num_classes: int
    image_size: int = 32
    map_score: float | None = None
    map_topk: int | None = None
    epochs: int | None = None
    train_seconds: float | None = None
    extra: dict = field(default_factory=dict)


class UnsafeCheckpoint(ValueError):
    """A checkpoint that would need unpickling arbitrary objects (refused)."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: CSQModel, centers: torch.Tensor, meta: CheckpointMeta) -> str:
    """Writes model weights and centres as safetensors with `meta` as JSON; returns the file's sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["centers"] = torch.as_tensor(centers, dtype=torch.float32).cpu().contiguous()
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"umcd": json.dumps(asdict(meta))})
    tmp.replace(path)
    return file_sha256(path)


def save_untrained_checkpoint(path: str | Path, bits: int = 16, backbone: str = "smallcnn", seed: int = 0) -> Path:
    """A checkpoint of ``backbone`` with random weights (seeded) and digits' 10 hash centres, 32x32 inputs:
    what quick benchmarks and tests serve when accuracy is not the point (no training). Returns ``path``."""
    from core.centers import make_centers
    from core.models import create_model

    torch.manual_seed(seed)
    model = create_model(backbone, bits).eval()
    centers = torch.from_numpy(make_centers(10, bits)).float()
    save_checkpoint(path, model, centers, CheckpointMeta(backbone, bits, "digits", 0, 10, 32, epochs=0))
    return Path(path)


@dataclass
class LoadedCheckpoint:
    model: CSQModel
    centers: torch.Tensor
    meta: CheckpointMeta
    sha256: str
    path: Path

    @property
    def version(self) -> str:
        """The model version: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("umcd", "{}"))
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses any pickled object that is not plain tensors/containers
        raise UnsafeCheckpoint(f"refused to load {path}: not a plain-tensor checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(obj, dict) or "tensors" not in obj:
        raise UnsafeCheckpoint(f"{path} is not a UMCD checkpoint (expected a dict with 'tensors' and 'meta')")
    return obj["tensors"], json.loads(obj.get("meta", "{}"))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Loads a `.safetensors` checkpoint (or a `.pt` one with `weights_only=True`); the model is in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    tensors, meta_d = _load_tensors(path)
    if not meta_d:
        raise ValueError(f"{path} has no UMCD metadata")
    meta = CheckpointMeta(**meta_d)
    model = CSQModel(meta.backbone, meta.bits)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return LoadedCheckpoint(model, tensors["centers"], meta, file_sha256(path), path)
