"""Stored database images: writing their bytes under artifacts/images and re-encoding them under a model version."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.index import pack_codes
from core.models import sign_codes
from umcd.settings import Settings
from workers.imaging import InvalidImage, decode_pixels, to_model

log = logging.getLogger(__name__)

_SAFE_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def images_dir(artifacts: str | Path) -> Path:
    return Path(artifacts) / "images"


def store_image(artifacts: str | Path, key: str, data: bytes, suffix: str = ".img") -> Path:
    """Write ``data`` to ``artifacts/images/<key[:2]>/<key>-<sha256 of data, 16 hex><suffix>`` atomically; returns
    the absolute path.

    ``key`` is a request id (or another id of ``[A-Za-z0-9._:-]``). The name holds a digest of the bytes, so a
    file once written is never replaced by other bytes: the same id sent again with another image (its verdict
    stands, its image is not screened) can never change what an accepted image's row points to, while a
    redelivery of the same bytes writes the same file again.
    """
    if not _SAFE_KEY.match(key) or key in (".", ".."):
        raise ValueError(f"unsafe image key {key!r}")
    folder = images_dir(artifacts).resolve() / key[:2].replace(".", "_")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if path.is_file():
        return path
    tmp = folder / f".{key}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def decode_for_model(data: bytes, settings: Settings, image_size: int) -> np.ndarray:
    """Image bytes -> (3, S, S) float32 in [0, 1] under the worker's limits (raises InvalidImage)."""
    return to_model(decode_pixels_for_model(data, settings, image_size))


def decode_pixels_for_model(data: bytes, settings: Settings, image_size: int) -> np.ndarray:
    """Image bytes -> (S, S, 3) uint8 (or (3, S, S) float32 for deeper samples) under the worker's limits:
    :func:`workers.imaging.decode_pixels`, converted to the model input per batch by ``to_model``."""
    return decode_pixels(
        data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
        min_side=settings.min_image_side, formats=settings.image_formats, size=(image_size, image_size),
        fast_png=settings.fast_png,
    )


@torch.no_grad()
def encode_packed(model: torch.nn.Module, images: torch.Tensor | np.ndarray, device: torch.device | str = "cpu",
                  batch_size: int = 256) -> np.ndarray:
    """Packed codes (n, K/8) uint8 of images (n, 3, S, S) float in [0, 1]."""
    x = torch.as_tensor(images, dtype=torch.float32)
    outs = []
    for start in range(0, len(x), batch_size):
        outs.append(sign_codes(model(x[start : start + batch_size].to(device))).cpu())
    if not outs:
        bits = getattr(model, "bits", 0)
        return np.zeros((0, bits // 8), dtype=np.uint8)
    return pack_codes(torch.cat(outs))


def encode_stored(
    model: torch.nn.Module,
    items: Sequence[tuple[int, str | None]],
    settings: Settings,
    image_size: int,
    device: torch.device | str = "cpu",
) -> tuple[list[tuple[int, bytes]], list[tuple[int, str]]]:
    """Re-encode stored images: ``items`` are ``(image_id, image_path)``.

    Returns ``([(image_id, packed code bytes)], [(image_id, why it failed)])``; an image whose file
    is missing or no longer decodes is reported, not raised.
    """
    ok_ids: list[int] = []
    arrays: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    for image_id, path in items:
        if not path:
            failed.append((image_id, "no stored image"))
            continue
        try:
            data = Path(path).read_bytes()
            arrays.append(decode_for_model(data, settings, image_size))
            ok_ids.append(int(image_id))
        except (OSError, InvalidImage) as exc:
            failed.append((image_id, f"{type(exc).__name__}: {exc}"))
    if not arrays:
        return [], failed
    packed = encode_packed(model, np.stack(arrays), device)
    return [(i, packed[j].tobytes()) for j, i in enumerate(ok_ids)], failed
