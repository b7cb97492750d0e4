"""Adversarial sets for the `attack` queue: attack the active model, write uint8 PNGs and an attack_sets row."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.attacks import anchor_codes_for_labels, get_attack, hamming, sign_codes
from core.attacks.success import targeted_success, untargeted_success
from core.checkpoint import load_checkpoint
from core.datasets import load_dataset
from core.pipeline import calibration_halves
from core.training import encode_set
from db import repo
from db.session import make_engine, session_scope
from umcd.settings import Settings, get_settings

log = logging.getLogger(__name__)


def attack_targets(attack, model: torch.nn.Module, splits, source_classes: np.ndarray, seed: int
                   ) -> tuple[torch.Tensor | None, np.ndarray | None]:
    """Targets for a targeted attack: ``(targets (n, K), target classes (n,))``, or ``(None, None)``.

    Each image gets a random target class other than its own. ``codes`` attacks (DHTA, adaptive)
    aim at the DHTA anchor code of that class in the database; ``outputs`` attacks (mimicry) copy
    the continuous output f of one random benign database image of that class.
    """
    if attack.target_kind is None:
        return None, None
    rng = np.random.default_rng(seed + 7)
    n_classes = splits.num_classes
    shift = rng.integers(1, n_classes, size=len(source_classes))
    target_classes = (source_classes + shift) % n_classes
    db_f = encode_set(model, splits.database)  # (N, K) continuous
    db_classes = splits.database.class_ids
    if attack.target_kind == "codes":
        targets = anchor_codes_for_labels(sign_codes(db_f), torch.as_tensor(db_classes),
                                          torch.as_tensor(target_classes), seed=seed)
    else:
        rows = [int(rng.choice(np.flatnonzero(db_classes == c))) for c in target_classes]
        targets = db_f[rows].clamp(-1, 1)
    return targets.float(), target_classes


def generate_attack_set(
    attack: str,
    *,
    n_images: int = 100,
    eps: float | None = None,
    seed: int = 0,
    name: str | None = None,
    settings: Settings | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Attack ``n_images`` held-out benign query images with the active model and store the result.

    ``params`` are the attack's hyper-parameters (``get_attack(attack, **params)``); ``eps`` is the
    L_inf budget in 1/255 units (None: the attack's default). Images come from the half of the query
    split the active calibration did not use. The adversarial images are quantized to uint8 and
    written as PNG files under ``artifacts/attacks/<id>/`` (what an attacker would upload) with a
    ``manifest.json``; success is measured again on the quantized images, and that rate is recorded.
    Returns ``{attack_set_id, path, success_rate, n_images, model_version}``.
    """
    from PIL import Image

    settings = settings or get_settings()
    engine = make_engine(settings.db_url)
    with session_scope(engine) as s:
        mv = repo.active_model_version(s)
        if mv is None:
            raise RuntimeError("no model version is published: run the train task first")
        cal = repo.active_calibration(s, mv.version, settings.detector)
        cal_seed = int((cal.meta or {}).get("seed", settings.seed)) if cal is not None else settings.seed
        version, ckpt_path = mv.version, mv.checkpoint_path
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model
    splits = load_dataset(ckpt.meta.dataset, settings.data_root, seed=ckpt.meta.split_seed)
    _, heldout = calibration_halves(len(splits.query), cal_seed)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(heldout, size=min(n_images, len(heldout)), replace=False))
    images = splits.query.get(pick)
    source_classes = splits.query.class_ids[pick]

    atk = get_attack(attack, **params)
    targets, target_classes = attack_targets(atk, model, splits, source_classes, seed)
    result = atk.run(model, images, targets=targets, eps=eps, seed=seed)
    adv_u8 = result.adv.mul(255).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        codes_q = sign_codes(model(adv_u8.float() / 255.0))
    threshold = atk.threshold_for(codes_q.shape[1])
    if atk.targeted:
        success = targeted_success(hamming(codes_q, sign_codes(targets)), threshold)
    else:
        success = untargeted_success(hamming(codes_q, result.codes_before), threshold)
    success_rate = float(success.float().mean()) if len(success) else 0.0
    record_params = {**result.params, "success_rate_float": result.success_rate, "quantized": "uint8",
                     "source": "query split, held-out half", "calibration_seed": cal_seed}

    root = (Path(settings.artifacts) / "attacks").resolve()
    with session_scope(engine) as s:
        set_id = repo.record_attack_set(
            s, name or f"{attack}-eps{record_params.get('eps')}-n{len(pick)}-seed{seed}", attack, record_params,
            path="", n_images=len(pick), success_rate=success_rate, model_version=version,
        )
        folder = root / str(set_id)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = adv_u8.permute(0, 2, 3, 1).numpy()
        manifest = []
        for k in range(len(pick)):
            file = f"{k:05d}.png"
            Image.fromarray(pixels[k], mode="RGB").save(folder / file, format="PNG")
            manifest.append({
                "file": file, "query_index": int(pick[k]), "label": int(source_classes[k]),
                "target_label": None if target_classes is None else int(target_classes[k]),
                "success": bool(success[k]),
            })
        (folder / "manifest.json").write_text(json.dumps(
            {"attack": attack, "attack_set_id": set_id, "model_version": version, "params": record_params,
             "success_rate": success_rate, "images": manifest}, indent=1))
        from db.models import AttackSet

        s.get(AttackSet, set_id).path = str(folder)
    log.info("attack set %d: %s on %d images, success %.3f, in %s", set_id, attack, len(pick), success_rate, folder)
    return {"attack_set_id": set_id, "path": str(folder), "success_rate": success_rate, "n_images": len(pick),
            "model_version": version}
