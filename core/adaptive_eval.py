"""The "adaptive" benchmark: every detector against the strongest white-box attack adapted to it, over eps."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import core.extensions as ext
from core.attacks import Attack, get_attack
from core.attacks.consistent import Penalty, pre_activations, pre_activations_with_features
from core.calibration import Calibration
from core.datasets import DatasetSplits
from core.detector import Detector
from core.models import sign_codes
from core.pipeline import build_index, calibration_halves
from core.training import encode_set, evaluate_retrieval

DEFAULT_DETECTORS = (
    "umcd", "umcd-nbr", "umcd-multi", "umcd-rand", "umcd-feat", "umcd-rand-feat",
    "umcd-fknn", "umcd-trust", "umcd-trust-input",
)

SUCCESS_RULE = (
    "an attacked image succeeds when Hamming(h(x'), sign(f_target)) <= K/8 bits, f_target being the output of a "
    "benign database image of another class (the class whose hash centre the source's pre-activations agree with "
    "most; plans marked `near` aim instead at the database image nearest to the source in the detector's first "
    "reference space among those of another code); TPR counts the successful adversarial images a detector rejects"
)
STRONGEST_RULE = (
    "per detector, among the attack configurations with at least `min_successes` successful images at the main "
    "eps, the one with the lowest TPR at the selection FPR (ties: the higher success rate); if none has enough "
    "successes, the one with the most undetected successes"
)


@dataclass
class AdaptiveConfig:
    """Sizes and grids of the adaptive benchmark (eps in 1/255 units)."""

    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    n_images: int = 100  # attacked images at the main eps
    n_sweep_images: int = 50  # attacked images at each other eps (the first of the main set)
    eps_main: float = 8.0
    eps_sweep: tuple[float, ...] = (4.0, 16.0, 32.0)
    steps: int = 50
    sweep_steps: int = 25  # PGD steps at the other eps values (larger budgets converge faster)
    eot_samples: int = 10
    weights: tuple[float, ...] = (4.0, 16.0)  # lambda grid of the adapted attacks
    eq13_lambda2: tuple[float, ...] = (0.3, 3.0)  # Eq. 13 sweep (lambda1 = 0.0075 as in the paper)
    mimicry_lambda3: tuple[float, ...] = (0.0, 1.0)  # output mimicry without / with the blur term
    margin: float = 2.0  # pre-activation margin of the hinge mimicry
    kappa: float = 0.8  # threshold-aware terms aim at kappa * threshold
    fprs: tuple[float, ...] = (0.05, 0.1)
    select_fpr: float = 0.1
    min_successes: int = 5
    top_k: int = 10
    seed: int = 0
    timing_repeats: int = 3


@dataclass(frozen=True)
class AttackPlan:
    """One attack configuration: ``family`` (eq13, mimicry, consistent), the detector it adapts to, its weight."""

    key: str
    family: str
    adapted_to: str
    weight: float
    params: dict = field(default_factory=dict, hash=False, compare=False)


# ---------------------------------------------------------------------------- adapting attacks to detectors


def _transform_reads(det: Detector) -> dict[int, str]:
    """Transform index -> the C3-type criterion reading it (c3 reads 0, c3@j reads j)."""
    reads = {}
    for name in det.calibration.names if det.calibration else det.spec.criteria:
        if name == "c3":
            reads[0] = name
        elif name.startswith("c3@"):
            reads[int(name[3:])] = name
    return reads


def fknn_penalty(ref: ext.FeatureReference, stages: Sequence[int], k: int = ext.FKNN_K) -> Penalty:
    """Pulls the stage features of x' onto its k nearest reference images whose code is within K/8 bits of the target.

    P(x') = sum_s mean_j ||φ_s(x') - r_j||², r_j re-chosen every step (no gradient through the choice).
    """

    def penalty(model, x_adv, targets):
        _, stages_out = pre_activations_with_features(model, x_adv)
        feats = ext.stage_features(x_adv, stages_out, stages)
        code = sign_codes(targets)
        bits = code.shape[1]
        near = 0.5 * (bits - code @ ref.codes.to(code.device).T) <= bits / 8  # (n, m) reference images "of" the target
        total = torch.zeros(x_adv.shape[0], device=x_adv.device, dtype=x_adv.dtype)
        for s in stages:
            r = ref.features[ref.stages.index(s)].to(x_adv.device)
            sim = (feats[s].detach() @ r.T).masked_fill(~near, -1e9)
            nn_ = sim.topk(min(k, r.shape[0]), dim=1).indices
            total = total + (feats[s].unsqueeze(1) - r[nn_]).pow(2).sum(-1).mean(1)
        return total

    penalty.__name__ = f"fknn-pull(stages={list(stages)})"
    return penalty


def trust_penalty(ref: ext.FeatureReference, stage_thresholds: Sequence[tuple[int, float]], kappa: float) -> Penalty:
    """Threshold-aware: sum_s relu(trust_s(x') - kappa·tau_s)/tau_s, trust_s the ratio of `ext.trust_ratio` with
    x' taking the target's code (the code it must end with)."""

    def penalty(model, x_adv, targets):
        _, stages_out = pre_activations_with_features(model, x_adv)
        feats = ext.stage_features(x_adv, stages_out, [s for s, _ in stage_thresholds])
        code = sign_codes(targets)
        total = torch.zeros(x_adv.shape[0], device=x_adv.device, dtype=x_adv.dtype)
        for s, tau in stage_thresholds:
            r = ref.features[ref.stages.index(s)].to(x_adv.device)
            ratio = ext.trust_ratio(feats[s], code, r, ref.codes.to(x_adv.device))
            total = total + torch.relu(ratio - kappa * tau) / tau
        return total

    penalty.__name__ = f"trust(stages={[s for s, _ in stage_thresholds]})"
    return penalty


def _sum_penalties(penalties: list[Penalty]) -> Penalty | None:
    if not penalties:
        return None
    if len(penalties) == 1:
        return penalties[0]

    def total(model, x_adv, targets):
        return sum(p(model, x_adv, targets) for p in penalties)

    total.__name__ = "+".join(p.__name__ for p in penalties)
    return total


def adapted_attack(det: Detector, weight: float, cfg: AdaptiveConfig, step_size: float = 1.0) -> Attack:
    """The consistent-mimicry attack adapted to ``det`` (calibrated at the selection FPR).

    Every deterministic transform a C3-type criterion reads (c3, c3@j; c3f and feat@s read the mean
    blur) becomes a view that must land on the target, with a threshold-aware C3 term; a random
    denoiser becomes EOT over its family (``eot_samples`` draws a step, threshold-aware too); feature
    criteria (feat@s, featr@s) become threshold-aware feature terms on the same views; feature-space
    neighbour criteria become `fknn_penalty` (fknn@s) and the threshold-aware `trust_penalty` (trust@s),
    weight 4·``weight``. One weight ``weight``
    scales the other terms; the thresholds and the reference are the detector's own (white-box).
    """
    cal = det.calibration
    assert cal is not None
    thr = cal.thresholds
    fixed: list[str] = []
    taus: list[float] = []
    eot_tau: float | None = None
    feature_terms: list[tuple[int, int, float]] = []
    fknn_stages: list[int] = []
    trust_stages: list[tuple[int, float]] = []
    random = False

    def view(name: str, tau: float | None) -> int:
        if name not in fixed:
            fixed.append(name)
            taus.append(math.inf)
        j = fixed.index(name)
        if tau is not None:
            taus[j] = min(taus[j], tau)
        return j

    for crit in cal.names:
        if crit == "c3" or crit.startswith("c3@"):
            k = 0 if crit == "c3" else int(crit[3:])
            if isinstance(det.transforms[k], ext.RandomDenoiser):
                random, eot_tau = True, thr[crit]
            else:
                view(det.spec.transforms[k], thr[crit])
        elif crit == "c3f":
            view(ext.FEATURE_TRANSFORM, thr[crit])
        elif crit.startswith("feat@"):
            feature_terms.append((int(crit[5:]), view(ext.FEATURE_TRANSFORM, None), thr[crit]))
        elif crit.startswith("featr@"):
            random = True
            feature_terms.append((int(crit[6:]), -1, thr[crit]))
        elif crit.startswith("fknn@"):
            fknn_stages.append(int(crit[5:]))
        elif crit.startswith("trust@"):
            trust_stages.append((ext.INPUT_STAGE if crit == "trust@in" else int(crit[6:]), thr[crit]))
    c3_thresholds = [t if math.isfinite(t) else 1e9 for t in taus] or None
    return get_attack(
        "consistent_mimicry",
        steps=cfg.steps,
        step_size=step_size,
        margin=cfg.margin,
        transforms=tuple(fixed),
        lambda_t=weight,
        c3_thresholds=c3_thresholds,
        eot_transform=ext.family_sampler() if random else None,
        eot_samples=cfg.eot_samples,
        lambda_eot=weight,
        eot_c3_threshold=eot_tau,
        lambda_c3=weight,
        feature_terms=feature_terms,
        lambda_feat=weight,
        penalty=_sum_penalties(
            ([fknn_penalty(det.reference, fknn_stages)] if fknn_stages else [])
            + ([trust_penalty(det.reference, trust_stages, cfg.kappa)] if trust_stages else [])
        ),
        lambda_penalty=4 * weight,
        kappa=cfg.kappa,
    )


def attack_signature(attack: Attack) -> tuple:
    """What an adapted attack optimises, thresholds aside: views, EOT, feature terms (stage, view), penalty."""
    h = attack.hyperparams
    return (tuple(h["transforms"]), bool(h["eot_samples"]), tuple((t[0], t[1]) for t in h["feature_terms"]), h["penalty"])


def attack_plans(cfg: AdaptiveConfig, detectors: dict[str, Detector] | None = None) -> list[AttackPlan]:
    """The paper's attacks, output mimicry, and one adapted attack per detector and weight.

    With calibrated ``detectors``, a detector whose adapted attack optimises the same terms as an
    earlier one's (`attack_signature`; e.g. umcd-nbr's C1 variant against umcd) gets no plans of its
    own: the earlier detector's adapted attacks are scored against it like every other attack.
    """
    plans = [AttackPlan(f"eq13(l2={l2:g})", "eq13", "umcd", l2, {"lambda1": 0.0075, "lambda2": l2}) for l2 in cfg.eq13_lambda2]
    plans += [AttackPlan(f"mimicry(l3={l3:g})", "mimicry", "umcd", l3, {"lambda3": l3}) for l3 in cfg.mimicry_lambda3]
    seen: set[tuple] = set()
    for d in cfg.detectors:
        if detectors is not None:
            sig = attack_signature(adapted_attack(detectors[d], 1.0, cfg))
            if sig in seen:
                continue
            seen.add(sig)
        plans += [AttackPlan(f"adapted[{d}](w={w:g})", "consistent", d, w) for w in cfg.weights]
        if d in ext.REFERENCE_DETECTORS:  # also aim at the other-code image nearest in the reference's space
            plans += [AttackPlan(f"adapted[{d}](w={w:g},near)", "consistent", d, w, {"targets": "near"})
                      for w in cfg.weights]
    return plans


def step_size_for(eps: float, steps: int) -> float:
    """PGD step in 1/255 units: 1/255, or 2.5·eps/steps when that is larger, so that the cosine-decayed (or
    constant) steps can cross the whole ball at large eps (25 steps of 1/255 never reach 32/255)."""
    return max(1.0, 2.5 * eps / steps)


def build_attack(plan: AttackPlan, detectors: dict[str, Detector], cfg: AdaptiveConfig, steps: int | None = None,
                 eps: float | None = None) -> Attack:
    steps = cfg.steps if steps is None else steps
    step_size = step_size_for(cfg.eps_main if eps is None else eps, steps)
    if plan.family == "eq13":
        return get_attack("adaptive", steps=steps, step_size=step_size, **plan.params)
    if plan.family == "mimicry":
        return get_attack("mimicry", steps=steps, step_size=step_size, **plan.params)
    return adapted_attack(detectors[plan.adapted_to], plan.weight, AdaptiveConfig(**{**asdict(cfg), "steps": steps}), step_size)


def view_count(attack: Attack) -> int:
    """Images pushed through the model per attacked image and step (the attack's cost unit)."""
    h = attack.hyperparams
    views = 1 + len(h.get("transforms") or []) + int(h.get("eot_samples") or 0) + (1 if h.get("penalty") else 0)
    if attack.name == "adaptive" or (attack.name == "mimicry" and h.get("lambda3", 0) > 0):
        views += 1
    return views


# ---------------------------------------------------------------------------- targets


def choose_targets(model, splits: DatasetSplits, images: torch.Tensor, source_classes: np.ndarray, seed: int):
    """(target outputs (n, K), target classes (n,), database ids (n,)) for the sources.

    The attacker aims at the other class whose hash centre (the majority code of its database
    images) agrees most with the source's pre-activations — the nearest class — and copies the output
    of a random benign database image of that class.
    """
    rng = np.random.default_rng(seed + 7)
    db_f = encode_set(model, splits.database)
    db_codes = sign_codes(db_f)
    db_cls = splits.database.class_ids
    classes = np.unique(db_cls)
    centres = torch.stack([sign_codes(db_codes[torch.as_tensor(db_cls == c)].sum(0, keepdim=True))[0] for c in classes])
    with torch.no_grad():
        z = pre_activations(model, images)
    agree = z @ centres.T
    same = torch.as_tensor(classes[None, :] == np.asarray(source_classes)[:, None])
    agree[same] = -math.inf
    tcls = classes[agree.argmax(1).numpy()]
    ids = np.array([rng.choice(np.nonzero(db_cls == c)[0]) for c in tcls])
    return db_f[torch.as_tensor(ids)], tcls, ids


def nearest_targets(model, splits: DatasetSplits, images: torch.Tensor, reference: ext.FeatureReference, stage: int):
    """(target outputs (n, K), database ids (n,)): per source, the reference (database) image nearest to it at
    ``stage`` among those whose code is more than K/8 bits from the source's — the target a defense reading
    that stage finds hardest to tell apart (the reference must hold the database split under ids 0..n-1).
    A source that no reference image differs from by more than K/8 bits gets the most different one."""
    db_f = encode_set(model, splits.database)
    with torch.no_grad():
        f, stages_out = model.forward_with_features(images)
    q = ext.stage_features(images, stages_out, [stage])[stage]
    r = reference.features[reference.stages.index(stage)]
    code = sign_codes(f)
    bits = code.shape[1]
    ham = 0.5 * (bits - code @ reference.codes.T)
    other = ham > bits / 8
    j = (q @ r.T).masked_fill(~other, -math.inf).argmax(1)
    none = ~other.any(1)  # every reference shares the source's code: take the one whose code differs most
    j = torch.where(none, ham.argmax(1), j).numpy()
    ids = reference.ids[j]
    return db_f[torch.as_tensor(ids)], ids


# ---------------------------------------------------------------------------- measuring


def forward_passes(det: Detector) -> int:
    """Images through the model per query: x, every spec transform, [x, t(x)] of the feature criteria, x again for fknn."""
    feats = any(n in ext.FEATURE_CRITERIA for n in det.spec.criteria)
    query_feats = any(n in ext.QUERY_FEATURE_CRITERIA for n in det.spec.criteria)
    return 1 + len(det.spec.transforms) + (2 if feats else 0) + (1 if query_feats else 0)


def time_ratio(det: Detector, images: torch.Tensor, repeats: int, batch: int = 100) -> tuple[float, float]:
    """(seconds per image of score_batch, of plain retrieval): the two timed alternately ``repeats`` times over
    ``images``, the fastest run of each kept (the CPU is shared: the minimum is the least disturbed)."""

    def once(fn) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            fn(images[i : i + batch])
        return time.perf_counter() - t0

    det_t, plain_t = [], []
    for _ in range(repeats):
        plain_t.append(once(det.retrieve))
        det_t.append(once(det.score_batch))
    return min(det_t) / len(images), min(plain_t) / len(images)


@dataclass
class Outcome:
    """One attack configuration at one eps: per-image success and, per detector and FPR, rejection."""

    plan: AttackPlan
    eps: float
    success: np.ndarray  # (n,) bool
    rejected: dict[str, dict[float, np.ndarray]]  # detector -> fpr -> (n,) bool
    seconds: float
    views: int
    params: dict

    def tpr(self, det: str, fpr: float) -> float:
        s = self.success
        return float(self.rejected[det][fpr][s].mean()) if s.any() else float("nan")

    def tpr_all(self, det: str, fpr: float) -> float:
        return float(self.rejected[det][fpr].mean())

    def undetected(self, det: str, fpr: float) -> float:
        return float((self.success & ~self.rejected[det][fpr]).mean())

    def head(self, m: int) -> "Outcome":
        """The same outcome restricted to its first m images."""
        return Outcome(self.plan, self.eps, self.success[:m],
                       {d: {f: r[:m] for f, r in by.items()} for d, by in self.rejected.items()},
                       self.seconds, self.views, self.params)

    @property
    def success_rate(self) -> float:
        return float(self.success.mean())


def strongest(outcomes: Sequence[Outcome], det: str, fpr: float, min_successes: int) -> Outcome:
    """The strongest attack against ``det`` (see STRONGEST_RULE)."""
    enough = [o for o in outcomes if int(o.success.sum()) >= min_successes]
    if enough:
        return min(enough, key=lambda o: (o.tpr(det, fpr), -o.success_rate))
    return max(outcomes, key=lambda o: (o.undetected(det, fpr), o.success_rate))


# ---------------------------------------------------------------------------- the benchmark


def run_adaptive_benchmark(
    model: torch.nn.Module,
    splits: DatasetSplits,
    *,
    config: AdaptiveConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    meta: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Runs the benchmark; returns the results dict and, with ``out_dir``, writes report.md, results.json and a PNG.

    ``log`` receives one line per finished attack run (useful when no terminal shows the progress bar).
    """
    cfg = config or AdaptiveConfig()
    t_start = time.perf_counter()
    model.eval()
    index = build_index(model, splits.database)
    cal_idx, held_idx = calibration_halves(len(splits.query), cfg.seed)
    cal_x, held_x = splits.query.get(cal_idx), splits.query.get(held_idx)

    reference = None
    if any(name in ext.REFERENCE_DETECTORS for name in cfg.detectors):
        reference = ext.FeatureReference.build(model, splits.database.get())

    # detectors, each calibrated on benign images only at every FPR
    dets: dict[str, dict[float, Detector]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in cfg.detectors:
        dets[name] = {}
        rows[name] = {"detector": name, "heldout_fpr": {}, "thresholds": {}}
        # raw scores once per detector; one calibration per FPR from the same benign scores
        base = ext.make_detector(name, model, index, reference=reference, top_k=cfg.top_k)
        cal_scores, held_scores = _raw_scores(base, cal_x), _raw_scores(base, held_x)
        for fpr in cfg.fprs:
            d = ext.make_detector(name, model, index, reference=reference, top_k=cfg.top_k)
            d.calibration = Calibration.fit(cal_scores, d.directions, fpr, detector=d.spec.name,
                                            transforms=list(d.spec.transforms), top_k=d.top_k)
            dets[name][fpr] = d
            rows[name]["heldout_fpr"][fpr] = float(d.calibration.reject(held_scores).mean())
            rows[name]["thresholds"][fpr] = d.calibration.thresholds
        d = dets[name][cfg.select_fpr]
        rows[name]["forward_passes"] = forward_passes(d)
        det_s, plain_s = time_ratio(d, held_x[:100], cfg.timing_repeats, batch=50)
        rows[name]["seconds_per_image"] = det_s
        rows[name]["plain_seconds_per_image"] = plain_s
        rows[name]["time_ratio"] = det_s / plain_s
        rows[name]["description"] = d.spec.description
        rows[name]["reference_bytes_per_image"] = (
            reference.nbytes_for(ext.required_stages(d.spec.criteria)) / len(reference) if reference is not None else 0
        )
    select = {name: dets[name][cfg.select_fpr] for name in cfg.detectors}
    retrieval_map = evaluate_retrieval(model, splits)

    # sources (held-out benign queries, never calibration images) and targets
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.n_images, len(held_idx))
    src = np.sort(rng.choice(held_idx, n, replace=False))
    x = splits.query.get(src)
    src_cls = splits.query.class_ids[src]
    f_target, tcls, tids = choose_targets(model, splits, x, src_cls, cfg.seed)

    near_cache: dict[str, torch.Tensor] = {}

    def targets_for(plan: AttackPlan) -> torch.Tensor:
        if plan.params.get("targets") != "near":
            return f_target
        if plan.adapted_to not in near_cache:
            stage = ext.required_stages(select[plan.adapted_to].spec.criteria)[0]
            near_cache[plan.adapted_to] = nearest_targets(model, splits, x, reference, stage)[0]
        return near_cache[plan.adapted_to]

    def run_plan(plan: AttackPlan, eps: float, m: int, steps: int) -> Outcome:
        attack = build_attack(plan, select, cfg, steps, eps)
        outputs = targets_for(plan)
        targets = sign_codes(outputs)[:m] if attack.target_kind == "codes" else outputs[:m]
        t0 = time.perf_counter()
        res = attack.run(model, x[:m], targets=targets, eps=eps, seed=cfg.seed)
        secs = time.perf_counter() - t0
        if log is not None:
            log(f"{plan.key} at eps {eps:g} on {m} images: success {float(res.success.float().mean()):.2f}, "
                f"{secs:.0f} s ({time.perf_counter() - t_start:.0f} s in total)")
        rejected = {}
        for name in cfg.detectors:
            raw = _raw_scores(dets[name][cfg.fprs[0]], res.adv)
            rejected[name] = {fpr: dets[name][fpr].calibration.reject(raw) for fpr in cfg.fprs}
        return Outcome(plan, eps, res.success.cpu().numpy(), rejected, secs, view_count(attack), res.params)

    plans = attack_plans(cfg, select)
    n_sweep = min(cfg.n_sweep_images, n)
    bar, task = _progress(progress, len(plans) + len(cfg.eps_sweep) * 2 * len(cfg.detectors))
    main: list[Outcome] = []
    try:
        for plan in plans:
            if bar:
                bar.update(task, description=f"eps {cfg.eps_main:g}: {plan.key}")
            main.append(run_plan(plan, cfg.eps_main, n, cfg.steps))
            if bar:
                bar.advance(task)
        chosen = {name: strongest(main, name, cfg.select_fpr, cfg.min_successes) for name in cfg.detectors}
        # eps sweep: every chosen configuration at every other eps, on the first n_sweep sources
        sweep: dict[float, list[Outcome]] = {}
        own = []
        for name in cfg.detectors:
            mine = [o for o in main if o.plan.family == "consistent" and o.plan.adapted_to == name]
            if mine:
                own.append(strongest(mine, name, cfg.select_fpr, cfg.min_successes).plan)
        uniq = list(dict.fromkeys([o.plan for o in chosen.values()] + own))
        for eps in cfg.eps_sweep:
            sweep[eps] = []
            for plan in uniq:
                if bar:
                    bar.update(task, description=f"eps {eps:g}: {plan.key}")
                sweep[eps].append(run_plan(plan, eps, n_sweep, cfg.sweep_steps))
                if bar:
                    bar.advance(task)
        if bar:
            bar.update(task, completed=bar.tasks[0].total)
    finally:
        if bar:
            bar.stop()

    # tables
    table = []
    for name in cfg.detectors:
        o = chosen[name]
        r = rows[name]
        table.append({
            "detector": name,
            "strongest_attack": o.plan.key,
            "success_rate": o.success_rate,
            "n_success": int(o.success.sum()),
            **{f"tpr@{f:g}": o.tpr(name, f) for f in cfg.fprs},
            f"tpr_all@{cfg.select_fpr:g}": o.tpr_all(name, cfg.select_fpr),
            f"undetected@{cfg.select_fpr:g}": o.undetected(name, cfg.select_fpr),
            **{f"heldout_fpr@{f:g}": r["heldout_fpr"][f] for f in cfg.fprs},
            "map": retrieval_map,
            "forward_passes": r["forward_passes"],
            "time_ratio": r["time_ratio"],
        })
    eps_curve = {name: {} for name in cfg.detectors}
    for name in cfg.detectors:
        o = chosen[name]
        eps_curve[name][cfg.eps_main] = {"attack": o.plan.key, "success_rate": o.success_rate,
                                         "n_success": int(o.success.sum()),
                                         "tpr": o.tpr(name, cfg.select_fpr), "undetected": o.undetected(name, cfg.select_fpr),
                                         "n": int(len(o.success))}
        for eps in sweep:
            # an attacker with budget eps may use any smaller budget: every run at eps' <= eps on the sweep images
            outs = [o for e, runs in sweep.items() if e <= eps for o in runs]
            if cfg.eps_main <= eps:
                outs += [o.head(n_sweep) for o in main]
            best = strongest(outs, name, cfg.select_fpr, cfg.min_successes)  # the same absolute floor as at eps_main
            eps_curve[name][eps] = {"attack": f"{best.plan.key} at eps {best.eps:g}", "success_rate": best.success_rate,
                                    "n_success": int(best.success.sum()),
                                    "tpr": best.tpr(name, cfg.select_fpr), "undetected": best.undetected(name, cfg.select_fpr),
                                    "n": int(len(best.success))}
    cross = {
        o.plan.key: {
            "success_rate": o.success_rate, "seconds": o.seconds, "views_per_step": o.views,
            **{name: {"tpr": o.tpr(name, cfg.select_fpr), "undetected": o.undetected(name, cfg.select_fpr)} for name in cfg.detectors},
        }
        for o in main
    }
    results = {
        "benchmark": "adaptive",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "dataset": splits.name,
        "split": splits.describe(),
        "n_calibration": int(len(cal_idx)),
        "n_heldout": int(len(held_idx)),
        "n_attacked": int(n),
        "n_sweep": int(n_sweep),
        "success_rule": SUCCESS_RULE,
        "strongest_rule": STRONGEST_RULE,
        "map": retrieval_map,
        "detectors": {k: {**v, "heldout_fpr": {str(f): x for f, x in v["heldout_fpr"].items()},
                          "thresholds": {str(f): x for f, x in v["thresholds"].items()}} for k, v in rows.items()},
        "table": table,
        "cross": cross,
        "eps_curve": {k: {str(e): v for e, v in c.items()} for k, c in eps_curve.items()},
        "attack_params": {o.plan.key: o.params for o in main},
        "target_classes": np.bincount(tcls, minlength=splits.num_classes).tolist(),
        "seconds": time.perf_counter() - t_start,
        "meta": meta or {},
    }
    if out_dir is not None:
        write_report(results, Path(out_dir))
    return results


def _raw_scores(det: Detector, images: torch.Tensor, batch: int = 250) -> dict[str, np.ndarray]:
    parts = [det.raw_scores(images[i : i + batch]) for i in range(0, len(images), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _progress(enabled: bool, total: int):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]adaptive[/] {task.description}"), BarColumn(),
                   TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    bar.start()
    return bar, bar.add_task("", total=total)


# ---------------------------------------------------------------------------- report


def _f(v: float, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(results: dict) -> str:
    """The "adaptive" table as Markdown."""
    cfg = results["config"]
    fprs = cfg["fprs"]
    sel = cfg["select_fpr"]
    head = (["detector", "strongest adaptive attack", "success"] + [f"TPR@{f:g}" for f in fprs]
            + [f"undetected@{sel:g}"] + [f"held-out FPR@{f:g}" for f in fprs]
            + ["mAP", "passes/query", "time ratio"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["table"]:
        cells = [f"`{r['detector']}`", r["strongest_attack"], f"{_f(r['success_rate'])} ({r['n_success']})"]
        cells += [_f(r[f"tpr@{f:g}"]) for f in fprs]
        cells += [_f(r[f"undetected@{sel:g}"])]
        cells += [_f(r[f"heldout_fpr@{f:g}"], 3) for f in fprs]
        cells += [_f(r["map"], 4), str(r["forward_passes"]), f"{r['time_ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict, out_dir: Path) -> Path:
    """Writes results.json, detection_vs_eps.png and report.md into out_dir; returns the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    png = plot_detection_vs_eps(results, out_dir / "detection_vs_eps.png")
    cfg = results["config"]
    sel = cfg["select_fpr"]
    dets = cfg["detectors"]
    lines = [
        f"# Adaptive benchmark ({results['dataset']})",
        "",
        f"{results['split']}. Thresholds from {results['n_calibration']} benign calibration queries; held-out FPR on the "
        f"other {results['n_heldout']}. Attacked: {results['n_attacked']} held-out queries at eps {cfg['eps_main']:g}/255, "
        f"{results['n_sweep']} at each of eps {', '.join(f'{e:g}' for e in cfg['eps_sweep'])}/255; {cfg['steps']} PGD steps "
        f"({cfg['sweep_steps']} at the other eps), step max(1, 2.5·eps/steps)/255, "
        f"EOT {cfg['eot_samples']} draws a step. Total {results['seconds'] / 60:.1f} min.",
        "",
        f"Success rule: {results['success_rule']}.",
        f"Strongest attack: {results['strongest_rule']} (min_successes = {cfg['min_successes']}, selection FPR {sel:g}).",
        "",
        f"## Table \"adaptive\" (eps = {cfg['eps_main']:g}/255)",
        "",
        markdown_table(results),
        "",
        "TPR: rejected fraction of the successful adversarial images; undetected: fraction of all attacked images that "
        "reach their target and pass. mAP: retrieval of the query split (codes are unchanged by detection). "
        "passes/query: images through the model per query (plain retrieval: 1); time ratio: measured score_batch time "
        "over plain retrieval time (best of repeats, shared CPU).",
        "",
        f"## Every attack against every detector (eps = {cfg['eps_main']:g}/255, TPR@{sel:g} among successes / undetected)",
        "",
        "| attack | success | views/step | seconds | " + " | ".join(f"`{d}`" for d in dets) + " |",
        "|" + "---|" * (4 + len(dets)),
    ]
    for key, c in results["cross"].items():
        cells = [key, _f(c["success_rate"]), str(c["views_per_step"]), f"{c['seconds']:.0f}"]
        cells += [f"{_f(c[d]['tpr'])} / {_f(c[d]['undetected'])}" for d in dets]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Detection against eps (TPR@{sel:g} of the strongest attack with budget at most eps)", "",
              f"eps {cfg['eps_main']:g}: the table above ({results['n_attacked']} images). Other eps: the first "
              f"{results['n_sweep']} of those images, the configurations chosen above plus each detector's own adapted "
              "attacks, and every run at a smaller budget (an attacker allowed eps may stay inside a smaller ball).", "",
              "| detector | " + " | ".join(f"eps {e}" for e in sorted(next(iter(results["eps_curve"].values())), key=float)) + " |",
              "|" + "---|" * (1 + len(next(iter(results["eps_curve"].values()))))]
    for d, curve in results["eps_curve"].items():
        cells = [f"`{d}`"] + [f"{_f(curve[e]['tpr'])} ({curve[e]['n_success']}/{curve[e]['n']} succ)"
                              for e in sorted(curve, key=float)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![detection vs eps]({png.name})", ""]
    lines += ["## Detectors", ""]
    for d, info in results["detectors"].items():
        ref = info.get("reference_bytes_per_image") or 0
        lines.append(f"- `{d}`: {info['description']} ({info['forward_passes']} passes/query, "
                     f"{info['seconds_per_image'] * 1e3:.3f} ms/image vs {info['plain_seconds_per_image'] * 1e3:.3f} ms plain"
                     + (f"; reference {ref:.0f} bytes per database image" if ref else "") + ")")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_detection_vs_eps(results: dict, path: Path) -> Path:
    """Two panels: TPR@selection FPR of the strongest attack, and its success rate, against eps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = results["config"]["select_fpr"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for d, curve in results["eps_curve"].items():
        eps = sorted(curve, key=float)
        xs = [float(e) for e in eps]
        axes[0].plot(xs, [curve[e]["tpr"] for e in eps], marker="o", label=d)
        axes[1].plot(xs, [curve[e]["success_rate"] for e in eps], marker="o", label=d)
    axes[0].set_ylabel(f"TPR at FPR {sel:g} (successful adversarials)")
    axes[1].set_ylabel("success rate of that attack")
    ticks = sorted({float(e) for c in results["eps_curve"].values() for e in c})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.set_xlabel("eps (1/255)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.9, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Adaptive attacks on {results['dataset']}: strongest attack per detector")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
