"""Publishing a model version: checkpoint, seeded database, calibration, re-encoded codes, then activation."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select

from core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from core.datasets import load_dataset
from core.extensions import REFERENCE_DETECTORS, FeatureReference, make_detector, reference_path
from core.pipeline import calibrate_detector, calibration_path, checkpoint_path
from db import repo
from db.models import DbImage
from db.session import make_engine, session_scope
from umcd.settings import Settings, export_detector_secret, get_settings
from workers.encoding import decode_for_model, encode_packed, encode_stored, images_dir
from workers.replica import Replica

log = logging.getLogger(__name__)

#: images re-encoded per model batch while publishing
REENCODE_CHUNK = 1024


@dataclass
class PublishResult:
    """What publishing wrote: the active model version, its calibration and what the database holds."""

    model_version: str
    checkpoint: str
    map: float | None
    calibration_id: int
    calibration_path: str
    detector: str
    heldout_fpr: float
    thresholds: dict[str, float]
    n_seeded: int
    n_reencoded: int
    n_unreadable: int
    n_active: int
    reencoded_through_seq: int
    seconds: float
    #: the FeatureReference file of a REFERENCE_DETECTORS detector (None for the others) and its image count
    reference_path: str | None = None
    n_reference: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    log.info(message)
    if progress is not None:
        progress(message)


def versioned_checkpoint(artifacts: str | Path, source: str | Path) -> tuple[Path, Any]:
    """Copy a checkpoint to ``artifacts/models/<stem>-<version>.safetensors`` (immutable) and load it.

    The model_versions row points at this copy, so a later training that overwrites the default
    checkpoint path cannot change what a published version means.
    """
    ckpt = load_checkpoint(source)
    m = ckpt.meta
    target = Path(artifacts) / "models" / f"csq-{m.dataset}-{m.backbone}-{m.bits}-{ckpt.version}.safetensors"
    target = target.resolve()
    if Path(source).resolve() != target and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    ckpt.path = target
    return target, ckpt


def _uint8_pixels(images: torch.Tensor) -> np.ndarray:
    """``(n, 3, S, S)`` floats in [0, 1] -> ``(n, S, S, 3)`` uint8: the pixels a seed image is stored with."""
    return images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _uint8_digests(images: torch.Tensor) -> list[bytes]:
    """One digest per image of ``(n, 3, S, S)`` floats in [0, 1], over its pixels as seeding stores them."""
    import hashlib

    return [hashlib.blake2b(np.ascontiguousarray(p).tobytes(), digest_size=16).digest() for p in _uint8_pixels(images)]


def queries_seeded_from_another_split(engine, splits, source: str, data_root: str | Path | None = None) -> np.ndarray:
    """(len(splits.query),) bool: the benign queries of ``splits`` that the database holds as trusted seed images
    seeded from another split of the same dataset (another split seed: one model's held-out queries can be another
    split's database images). Such a query has an exact copy among its neighbours, which a new input does not, so
    calibrating on it would set the thresholds as if every input had one. Seed images are named
    ``<dataset>-<split seed>-<index in that split's database>.png`` (``seed_database``)."""
    with session_scope(engine) as s:
        paths = s.scalars(select(DbImage.image_path).where(DbImage.source == source,
                                                           DbImage.status == "active")).all()
    others: dict[int, list[int]] = {}
    for path in paths:
        name, _, rest = Path(path or "").stem.rpartition("-")
        dataset, _, split_seed = name.rpartition("-")
        if dataset == splits.name and split_seed.isdigit() and rest.isdigit() and int(split_seed) != splits.seed:
            others.setdefault(int(split_seed), []).append(int(rest))
    inside = np.zeros(len(splits.query), dtype=bool)
    if not others:
        return inside
    seeded: set[bytes] = set()
    for split_seed, idx in others.items():
        database = load_dataset(splits.name, data_root, seed=split_seed).database
        seeded.update(_uint8_digests(database.get(np.sort(np.asarray(idx)))))
    for start in range(0, len(splits.query), 1024):
        block = splits.query.get(np.arange(start, min(start + 1024, len(splits.query))))
        inside[start : start + len(block)] = [d in seeded for d in _uint8_digests(block)]
    return inside


def seed_database(session, ckpt, splits, artifacts: str | Path, *, fraction: float, source: str,
                  seed: int) -> int:
    """Insert ``fraction`` of the dataset's database split as trusted ``active`` images (not screened).

    Each image is stored as a PNG under ``artifacts/images/seed/`` (so later versions can re-encode
    it) and its code under ``ckpt.version`` goes to ``image_codes`` and ``index_log``. Returns how
    many were inserted (0 when images of ``source`` are there already: seeding happens once).
    """
    from PIL import Image

    repo.lock_seeding(session)  # two publishes at once: the second finds the first's images and seeds none
    already = session.execute(select(func.count()).select_from(DbImage).where(DbImage.source == source)).scalar()
    if already:
        return 0
    db = splits.database
    n = int(round(len(db) * fraction))
    if n <= 0:
        return 0
    idx = np.sort(np.random.default_rng(seed).permutation(len(db))[:n])
    images = db.get(idx)  # (n, 3, S, S) float in [0, 1], from uint8
    folder = (images_dir(artifacts) / "seed").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    pixels = _uint8_pixels(images)
    for j, i in enumerate(idx):
        path = folder / f"{splits.name}-{splits.seed}-{int(i)}.png"
        if not path.exists():
            Image.fromarray(pixels[j], mode="RGB").save(path, format="PNG")
        paths.append(str(path))
    codes = encode_packed(ckpt.model, images, next(ckpt.model.parameters()).device)
    labels = [int(c) for c in db.subset(idx).class_ids]
    repo.add_database_images(session, [c.tobytes() for c in codes], ckpt.version, source=source, labels=labels,
                             image_paths=paths)
    return n


def build_reference(engine, ckpt, settings: Settings, *, source: str) -> FeatureReference:
    """A FeatureReference of the trusted seed images (active ``db_images`` of ``source``) under ``ckpt``'s model.

    Only images seeded by the publisher (inserted directly, never screened) go in: an insertion that
    passed screening could be an attacker's, and the trust criteria compare queries with this
    reference. Features are those of ``core.extensions.FeatureReference.build`` (default stages:
    input 8x8 and backbone stages 0 and 1), ids are the images' ``db_images`` ids. Raises
    RuntimeError when no seed image can be read.
    """
    with session_scope(engine) as s:
        rows = s.execute(select(DbImage.id, DbImage.image_path)
                         .where(DbImage.source == source, DbImage.status == "active")
                         .order_by(DbImage.id)).all()
    ids: list[int] = []
    arrays: list[np.ndarray] = []
    for image_id, path in rows:
        try:
            data = Path(path).read_bytes() if path else b""
            arrays.append(decode_for_model(data, settings, ckpt.meta.image_size))
            ids.append(int(image_id))
        except Exception as exc:  # noqa: BLE001 - a missing or broken file leaves this image out
            log.warning("seed image %d is left out of the feature reference: %s: %s", image_id,
                        type(exc).__name__, exc)
    if not arrays:
        raise RuntimeError(f"no readable trusted images of source {source!r} in the database to build the "
                           f"feature reference from (publish with seed_fraction > 0)")
    return FeatureReference.build(ckpt.model, torch.from_numpy(np.stack(arrays)), ids=np.asarray(ids, np.int64))


def reencode_missing(engine, ckpt, settings: Settings, *, progress: Callable[[str], None] | None = None
                     ) -> tuple[int, int]:
    """Encode every active image that has no code under ``ckpt.version`` yet; returns (added, unreadable)."""
    with session_scope(engine) as s:
        todo = repo.images_without_code(s, ckpt.version)
    if not todo:
        return 0, 0
    _say(progress, f"re-encoding {len(todo)} database images under {ckpt.version}")
    device = next(ckpt.model.parameters()).device
    added = unreadable = 0
    for start in range(0, len(todo), REENCODE_CHUNK):
        codes, failed = encode_stored(ckpt.model, todo[start : start + REENCODE_CHUNK], settings,
                                      ckpt.meta.image_size, device)
        for image_id, why in failed:
            log.warning("image %d is not re-encoded under %s: %s", image_id, ckpt.version, why)
        unreadable += len(failed)
        with session_scope(engine) as s:
            added += repo.add_image_codes_bulk(s, ckpt.version, codes)
    return added, unreadable


def publish(
    checkpoint: str | Path,
    *,
    settings: Settings | None = None,
    seed_fraction: float = 0.5,
    seed_source: str = "seed",
    target_fpr: float | None = None,
    detector: str | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    data_root: str | Path | None = None,
    map_score: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> PublishResult:
    """Make ``checkpoint`` the active model version of the fleet.

    1. copy the checkpoint to an immutable versioned file;
    2. seed the database once with ``seed_fraction`` of the dataset's database split (source
       ``seed_source``, trusted: inserted directly, not screened);
    3. re-encode every active database image under the new version (``image_codes`` and
       ``index_log`` adds, so replicas of the new version build from the log);
    4. for a detector of ``core.extensions.REFERENCE_DETECTORS`` (umcd-trust-input, ...), build the
       FeatureReference of the trusted seed images (``build_reference``) and save it at
       ``reference_path(artifacts, version)``, where workers load it; then calibrate the detector
       on one benign half of the query split against that index (the index the workers will
       search) and store the calibration (JSON file + ``calibrations`` row; its meta records the
       reference path);
    5. one more re-encoding pass for images inserted meanwhile, then mark the version active and
       record the log position it covers (workers re-encode later stragglers themselves);
    6. write the index snapshot ``artifacts/index/<version>.faiss`` with its watermark.

    Detection workers notice the new active version within ``model_poll_interval_s`` and switch.
    """
    t0 = time.perf_counter()
    settings = settings or get_settings()
    engine = make_engine(settings.db_url)
    artifacts = Path(settings.artifacts)
    detector = detector or settings.detector
    top_k = top_k or settings.top_k
    target_fpr = target_fpr or settings.target_fpr
    seed = settings.seed if seed is None else seed
    export_detector_secret(settings)  # umcd-rand*: calibrate under the secret the workers will use
    path, ckpt = versioned_checkpoint(artifacts, checkpoint)
    version = ckpt.version
    meta = ckpt.meta
    _say(progress, f"publishing model {version} ({meta.backbone}, {meta.bits} bits, {meta.dataset})")
    splits = load_dataset(meta.dataset, data_root or settings.data_root, seed=meta.split_seed)

    with session_scope(engine, write=True) as s:  # on SQLite, the write lock serialises concurrent seeding
        n_seeded = seed_database(s, ckpt, splits, artifacts, fraction=seed_fraction, source=seed_source, seed=seed)
    if n_seeded:
        _say(progress, f"seeded the database with {n_seeded} trusted images of {meta.dataset}")
    n_added, n_unreadable = reencode_missing(engine, ckpt, settings, progress=progress)

    replica = Replica.bootstrap(engine, version, meta.bits, snapshot_dir=None)
    reference = ref_path = None
    extra_meta: dict[str, Any] = {}
    if detector in REFERENCE_DETECTORS:
        reference = build_reference(engine, ckpt, settings, source=seed_source)
        ref_path = reference_path(artifacts, version).resolve()
        reference.save(ref_path)
        extra_meta = {"reference": str(ref_path), "n_reference": len(reference)}
        _say(progress, f"feature reference of {len(reference)} trusted images for {detector}: {ref_path}")
    det = make_detector(detector, ckpt.model, replica.index, reference=reference, transform=settings.transform,
                        top_k=top_k)
    in_index = queries_seeded_from_another_split(engine, splits, seed_source, data_root or settings.data_root)
    if in_index.any():  # calibrate on queries that are new to the index, as the inputs it will judge are
        _say(progress, f"{int(in_index.sum())} of the {len(in_index)} benign queries of split seed {splits.seed} are "
                       f"trusted images the database was seeded with from another split: calibrating on the other "
                       f"{int((~in_index).sum())}")
        extra_meta = {**extra_meta, "queries_in_index_left_out": int(in_index.sum())}
        splits = replace(splits, query=splits.query.subset(np.flatnonzero(~in_index)))
    report = calibrate_detector(det, splits, target_fpr=target_fpr, seed=seed,
                                checkpoint_sha256=ckpt.sha256, model_version=version, **extra_meta)
    cal = report.calibration
    cal_path = cal.save(calibration_path(artifacts, version, det.spec.name)).resolve()
    _say(progress, f"calibrated {det.spec.name} at target FPR {target_fpr:.3f} against {len(replica)} codes: "
                   f"held-out FPR {report.heldout_fpr:.3f}")

    with session_scope(engine) as s:
        repo.add_model_version(
            s, version, str(path), ckpt.sha256, meta.backbone, meta.bits, meta.dataset,
            map_score=map_score if map_score is not None else meta.map_score,
            meta={"epochs": meta.epochs, "split_seed": meta.split_seed, "image_size": meta.image_size},
        )
        cal_row = repo.add_calibration(
            s, version, det.spec.name, det.spec.transforms[0], cal.target_fpr, cal.n_samples, cal.thresholds,
            path=str(cal_path),
            meta={"heldout_fpr": report.heldout_fpr, "n_heldout": report.n_heldout, "seed": seed,
                  "crossfit_fpr": cal.meta.get("crossfit_fpr"), "expected_fpr": cal.expected_fpr,
                  "top_k": top_k, **extra_meta, "calibration": asdict(cal)},
        )
        calibration_id = int(cal_row.id)

    with session_scope(engine) as s:
        head = repo.max_log_seq(s)
    more, more_unreadable = reencode_missing(engine, ckpt, settings, progress=progress)
    with session_scope(engine) as s:
        row = repo.publish_model_version(s, version)
        row.meta = {**(row.meta or {}), "reencoded_through_seq": head, "calibration_id": calibration_id}
        n_active = repo.image_counts(s)["active"]
    replica.sync(engine)
    replica.save_snapshot(artifacts / "index")
    seconds = time.perf_counter() - t0
    _say(progress, f"model {version} is active: {n_active} active images, calibration {calibration_id} "
                   f"({seconds:.1f} s)")
    return PublishResult(
        model_version=version, checkpoint=str(path), map=map_score if map_score is not None else meta.map_score,
        calibration_id=calibration_id, calibration_path=str(cal_path), detector=det.spec.name,
        heldout_fpr=float(report.heldout_fpr), thresholds=dict(cal.thresholds), n_seeded=n_seeded,
        n_reencoded=n_added + more, n_unreadable=n_unreadable + more_unreadable, n_active=n_active,
        reencoded_through_seq=head, seconds=seconds,
        reference_path=None if ref_path is None else str(ref_path),
        n_reference=0 if reference is None else len(reference),
    )


def train_checkpoint(
    *,
    settings: Settings | None = None,
    dataset: str | None = None,
    bits: int | None = None,
    backbone: str | None = None,
    epochs: int = 30,
    seed: int | None = None,
    data_root: str | Path | None = None,
    device: str | None = None,
    progress_bar: bool = False,
    out: str | Path | None = None,
) -> tuple[Path, float]:
    """Train CSQ and save its checkpoint (default path under ``artifacts/models``); returns (path, mAP)."""
    from core.training import train_and_evaluate

    settings = settings or get_settings()
    dataset = dataset or settings.dataset
    bits = bits or settings.bits
    backbone = backbone or settings.backbone
    seed = settings.seed if seed is None else seed
    splits = load_dataset(dataset, data_root or settings.data_root, seed=seed)
    r = train_and_evaluate(splits, bits=bits, backbone=backbone, epochs=epochs, seed=seed,
                           device=device or settings.device, progress=progress_bar)
    meta = CheckpointMeta(
        backbone=backbone, bits=bits, dataset=dataset, split_seed=seed, num_classes=splits.num_classes,
        image_size=splits.query.image_size, map_score=r.map_score, epochs=epochs, train_seconds=r.seconds,
        extra={"database_includes_train": splits.database_includes_train},
    )
    path = Path(out) if out is not None else checkpoint_path(settings.artifacts, dataset, bits, backbone)
    save_checkpoint(path, r.model.cpu(), r.centers, meta)
    return path, float(r.map_score)


def train_and_publish(
    *,
    settings: Settings | None = None,
    dataset: str | None = None,
    bits: int | None = None,
    backbone: str | None = None,
    epochs: int = 30,
    seed: int | None = None,
    target_fpr: float | None = None,
    publish_model: bool = True,
    seed_fraction: float = 0.5,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """The ``umcd.train`` task's work: train, save, and (with ``publish_model``) publish; recorded in train_runs.

    Returns ``{model_version, checkpoint, map, calibration_id, train_run_id}`` (``calibration_id``
    None when not published; the version is then registered inactive).
    """
    settings = settings or get_settings()
    engine = make_engine(settings.db_url)
    params = {"bits": bits or settings.bits, "backbone": backbone or settings.backbone, "epochs": epochs,
              "seed": settings.seed if seed is None else seed, "target_fpr": target_fpr or settings.target_fpr,
              "publish": publish_model, "seed_fraction": seed_fraction}
    dataset = dataset or settings.dataset
    with session_scope(engine) as s:
        run_id = repo.start_train_run(s, dataset, params)
    try:
        _say(progress, f"training CSQ on {dataset}: {params['backbone']}, {params['bits']} bits, {epochs} epochs")
        path, map_score = train_checkpoint(settings=settings, dataset=dataset, bits=params["bits"],
                                           backbone=params["backbone"], epochs=epochs, seed=params["seed"],
                                           device=device, progress_bar=progress_bar)
        _say(progress, f"trained: mAP {map_score:.4f}; checkpoint {path}")
        if publish_model:
            result = publish(path, settings=settings, seed_fraction=seed_fraction, target_fpr=params["target_fpr"],
                             seed=params["seed"], map_score=map_score, progress=progress)
            out = {"model_version": result.model_version, "checkpoint": result.checkpoint, "map": map_score,
                   "calibration_id": result.calibration_id, "heldout_fpr": result.heldout_fpr}
        else:
            vpath, ckpt = versioned_checkpoint(settings.artifacts, path)
            with session_scope(engine) as s:
                m = ckpt.meta
                repo.add_model_version(s, ckpt.version, str(vpath), ckpt.sha256, m.backbone, m.bits, m.dataset,
                                       map_score=map_score, meta={"epochs": m.epochs, "split_seed": m.split_seed})
            out = {"model_version": ckpt.version, "checkpoint": str(vpath), "map": map_score, "calibration_id": None}
    except BaseException as exc:
        with session_scope(engine) as s:
            repo.finish_train_run(s, run_id, results={"error": f"{type(exc).__name__}: {exc}"}, status="failed")
        raise
    with session_scope(engine) as s:
        repo.finish_train_run(s, run_id, model_version=out["model_version"], results=out)
    out["train_run_id"] = run_id
    return out
