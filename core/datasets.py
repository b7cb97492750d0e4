"""Datasets with disjoint query / train / database splits: digits (default), cifar10, folder, list.

Nothing is downloaded: `digits` ships with scikit-learn, the others load from a local root.
Images are float tensors `(n, 3, S, S)` in [0, 1]; labels are multi-hot `(n, C)` int8 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.registry import Registry

DATASETS: Registry["DatasetSplits"] = Registry("dataset")


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not where they were expected; the message says where and how to fix it."""


@dataclass
class ImageSet:
    """Images and labels of one split.

    images: (n, 3, S, S) uint8 (in memory) or None with `paths` (loaded lazily with Pillow).
    labels: (n, C) int8 multi-hot.
    """

    labels: np.ndarray
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    image_size: int = 32

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_ids(self) -> np.ndarray:
        """(n,) the first class of each image (single-label sets: the class)."""
        return self.labels.argmax(axis=1)

    def get(self, indices=None) -> torch.Tensor:
        """Float images (m, 3, S, S) in [0, 1] for the given indices (all when None)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        if self.images is not None:
            return self.images[torch.as_tensor(idx, dtype=torch.long)].float().div_(255.0)
        assert self.paths is not None
        return torch.stack([_load_path(self.paths[i], self.image_size) for i in idx])

    def subset(self, indices) -> "ImageSet":
        idx = np.asarray(indices)
        return ImageSet(
            labels=self.labels[idx],
            images=None if self.images is None else self.images[torch.as_tensor(idx, dtype=torch.long)],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            image_size=self.image_size,
        )

    def batches(self, batch_size: int):
        """Yields (indices, images) chunks of at most batch_size."""
        for start in range(0, len(self), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self)))
            yield idx, self.get(idx)


@dataclass
class DatasetSplits:
    """Disjoint query / train / database splits of one dataset (train may be part of the database)."""

    name: str
    query: ImageSet
    train: ImageSet
    database: ImageSet
    num_classes: int
    seed: int
    multi_label: bool = False
    database_includes_train: bool = False
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        inc = "includes" if self.database_includes_train else "excludes"
        return (
            f"{self.name}: {len(self.query)} query, {len(self.train)} train, {len(self.database)} database "
            f"(database {inc} the training images), {self.num_classes} classes, seed {self.seed}"
        )


def _load_path(path: str, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        arr = np.array(im, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(classes), num_classes), dtype=np.int8)
    out[np.arange(len(classes)), classes] = 1
    return out


def split_per_class(
    classes: np.ndarray, query_per_class: int, train_per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (query, train, rest) drawn per class with a seed; the three are disjoint.

    With train_per_class None the train split is empty and every non-query image is in `rest`.
    """
    rng = np.random.default_rng(seed)
    q, t, r = [], [], []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        rng.shuffle(idx)
        nq = min(query_per_class, len(idx))
        q.append(idx[:nq])
        if train_per_class is None:
            r.append(idx[nq:])
        else:
            t.append(idx[nq : nq + train_per_class])
            r.append(idx[nq + train_per_class :])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(q), cat(t), cat(r)


def _to_uint8_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, c, h, w) float in [0,1] -> (n, 3, size, size) uint8."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).contiguous()


@DATASETS.register("digits")
def load_digits(
    root: str | Path | None = None, *, seed: int = 0, image_size: int = 32, query_per_class: int = 100, **_
) -> DatasetSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upsampled to image_size x image_size x 3.

    Split: `query_per_class` queries per class; every other image is in the database, and the
    database is the training set (as DeepHash's `cifar10-1` convention: the database includes
    the training images; the queries are disjoint from both).
    """
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    imgs = _to_uint8_rgb(x, image_size)
    classes = d.target.astype(np.int64)
    qi, _, ri = split_per_class(classes, query_per_class, None, seed)
    labels = one_hot(classes, 10)
    mk = lambda idx: ImageSet(labels=labels[idx], images=imgs[torch.as_tensor(idx)], image_size=image_size)  # noqa: E731
    db = mk(ri)
    return DatasetSplits(
        "digits", query=mk(qi), train=db, database=db, num_classes=10, seed=seed, database_includes_train=True
    )


@DATASETS.register("cifar10")
def load_cifar10(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    image_size: int = 32,
    query_per_class: int = 100,
    train_per_class: int = 500,
    **_,
) -> DatasetSplits:
    """torchvision's CIFAR-10 from a local root, DeepHash split: 100/class query, 500/class train, rest database."""
    if root is None:
        raise DatasetNotFound(
            "cifar10 needs a local copy: pass --data-root DIR (or UMCD_DATA_ROOT) pointing at the folder that "
            "holds cifar-10-batches-py/ (the python version from the CIFAR-10 site); nothing is downloaded"
        )
    root = Path(root)
    if not (root / "cifar-10-batches-py").is_dir():
        raise DatasetNotFound(
            f"CIFAR-10 not found: expected {root / 'cifar-10-batches-py'} (the python version of CIFAR-10, "
            "unpacked). Put it there or pass another --data-root; nothing is downloaded"
        )
    from torchvision.datasets import CIFAR10

    parts = [CIFAR10(str(root), train=t, download=False) for t in (True, False)]
    data = np.concatenate([p.data for p in parts])  # (n, 32, 32, 3) uint8
    classes = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    imgs = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    if image_size != 32:
        imgs = _to_uint8_rgb(imgs.float() / 255.0, image_size)
    qi, ti, ri = split_per_class(classes, query_per_class, train_per_class, seed)
    labels = one_hot(classes, 10)
    mk = lambda idx: ImageSet(labels=labels[idx], images=imgs[torch.as_tensor(idx)], image_size=image_size)  # noqa: E731
    return DatasetSplits("cifar10", query=mk(qi), train=mk(ti), database=mk(ri), num_classes=10, seed=seed)


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@DATASETS.register("folder")
def load_folder(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    image_size: int = 32,
    query_per_class: int = 10,
    train_per_class: int = 50,
    **_,
) -> DatasetSplits:
    """An ImageNet-style folder: one sub-folder per class holding its images; loaded lazily."""
    if root is None or not Path(root).is_dir():
        raise DatasetNotFound(
            f"folder dataset not found: expected a directory of class sub-folders at {root!s} "
            "(ROOT/<class>/<image>.jpg); pass it with --data-root / UMCD_DATA_ROOT"
        )
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    paths, classes = [], []
    for c, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                paths.append(str(f))
                classes.append(c)
    if not paths:
        raise DatasetNotFound(f"folder dataset at {root} holds no images in class sub-folders")
    classes = np.asarray(classes)
    labels = one_hot(classes, len(class_dirs))
    qi, ti, ri = split_per_class(classes, query_per_class, train_per_class, seed)
    mk = lambda idx: ImageSet(labels=labels[idx], paths=[paths[i] for i in idx], image_size=image_size)  # noqa: E731
    return DatasetSplits(
        "folder", query=mk(qi), train=mk(ti), database=mk(ri), num_classes=len(class_dirs), seed=seed,
        info={"classes": [d.name for d in class_dirs]},
    )


def read_list_file(path: Path, root: Path) -> tuple[list[str], np.ndarray]:
    """Parses `relative/path.jpg 0 1 0 ...` lines into (absolute paths, (n, C) int8 labels)."""
    paths, rows = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"{path}:{lineno}: expected 'path label-vector', got {line!r}")
        p = Path(parts[0])
        paths.append(str(p if p.is_absolute() else root / p))
        rows.append([int(v) for v in parts[1:]])
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: label vectors have different lengths {sorted(widths)}")
    return paths, np.asarray(rows, dtype=np.int8)


@DATASETS.register("list")
def load_list(root: str | Path | None = None, *, seed: int = 0, image_size: int = 32, **_) -> DatasetSplits:
    """Multi-label list files (MS-COCO, NUS-WIDE in DeepHash's format): ROOT/{train,test,database}.txt.

    Each line is `path label-vector`; `test.txt` is the query split. Relevance: labels share a class.
    """
    if root is None:
        raise DatasetNotFound("list dataset needs --data-root DIR holding train.txt, test.txt and database.txt")
    root = Path(root)
    files = {s: root / f"{s}.txt" for s in ("train", "test", "database")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DatasetNotFound(
            f"list dataset not found: expected {', '.join(missing)} (lines 'path label-vector'); "
            "pass the folder holding them with --data-root / UMCD_DATA_ROOT"
        )
    sets = {}
    for s, f in files.items():
        paths, labels = read_list_file(f, root)
        sets[s] = ImageSet(labels=labels, paths=paths, image_size=image_size)
    return DatasetSplits(
        "list", query=sets["test"], train=sets["train"], database=sets["database"],
        num_classes=sets["train"].labels.shape[1], seed=seed, multi_label=True,
    )


def load_dataset(name: str = "digits", root: str | Path | None = None, **kwargs) -> DatasetSplits:
    """The splits of a registered dataset (`digits`, `cifar10`, `folder`, `list`)."""
    return DATASETS.get(name)(root, **kwargs)
