"""The rq training job: annotation store -> examples -> fine-tuned model -> new live version."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from rq import get_current_job

from ml_backend.config import Settings, TrainingSettings
from ml_backend.explain.cam import HeatmapExplainer, normalise_maps
from ml_backend.feedback.annotations import IGNORE, AnnotationRecord, RegionError, decode_region
from ml_backend.feedback.queue import TRAINING, coalesced_run, connect, key
from ml_backend.feedback.reconcile import reconcile_with_label_studio
from ml_backend.feedback.retrain_policy import snapshot_taken
from ml_backend.feedback.store import AnnotationStore
from ml_backend.io.images import ImageError, ImageFetcher, load_image
from ml_backend.io.label_config import parse_label_config
from ml_backend.measure.metrics import (
    choose_thresholds,
    evaluate_version,
    fairness_coverage,
    patient_groups,
    per_finding_metrics,
)
from ml_backend.measure.payloads import VersionMetrics
from ml_backend.models.classifier import normalisation, pick_device
from ml_backend.models.registry import ModelRegistry, model_from_version
from ml_backend.models.store import VersionInfo, VersionRepository, VersionStore
from ml_backend.rank.job import schedule_ranking
from ml_backend.train.examples import Example, ExampleTensors, holdout_split, skipped_regions_summary, tensorise
from ml_backend.train.losses import LossConfig
from ml_backend.train.mask_propagation import PropagationConfig
from ml_backend.train.promotion import PromotionDecision, PromotionPolicy, decide
from ml_backend.train.suggestions import (
    DETECTOR_FILE,
    SuggestionStore,
    load_detector,
    rejected_tensors,
    suggestion_outcomes,
)
from ml_backend.train.trainer import TrainConfig, TrainingRun, fine_tune, heatmap_grid, predict_probabilities

log = logging.getLogger(__name__)


def train_config(training: TrainingSettings) -> TrainConfig:
    loss = LossConfig(
        prediction=training.prediction_loss,
        ignore_weight=training.ignore_weight,
        input_gradient_on_propagated=training.input_gradient_on_propagated,
        evidence_weight=training.evidence_weight,
        counterfactuals=training.counterfactuals,
        artefact_paste_rate=training.artefact_paste_rate,
        decorrelate_cooccurrence=training.decorrelate_cooccurrence,
    )
    return TrainConfig(
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        loss=loss,
        propagation=PropagationConfig(experts=training.propagation_experts) if training.mask_propagation else None,
    )


def _progress(**meta: Any) -> None:
    job = get_current_job()
    log.info("progress %s", meta)
    if job is not None:
        job.meta.update(meta, updated_at=time.time())
        job.save_meta()


def record_to_example(
    record: AnnotationRecord, labels: tuple[str, ...], settings: Settings, http: ImageFetcher | None = None
) -> Example:
    """Fetch the image and decode the regions at its natural size; raises ValueError/ImageError with the reason
    when the image cannot be used. A region that cannot be decoded is skipped and listed in ``Example.skipped``
    (with those the webhook already skipped), the rest of the annotation is kept."""
    image = load_image(record.image_ref, settings, http)
    targets = np.array([label in record.positives for label in labels], dtype=np.float32)
    ignore: np.ndarray | None = None
    evidence: dict[int, np.ndarray] = {}
    skipped = [dict(s) for s in record.skipped]
    for mask_key, mask in record.masks.items():
        name = mask_key.split("#", 1)[0]
        where = mask.where or mask_key
        if name != IGNORE and name not in labels:
            skipped.append(
                {"where": where, "code": "unknown_label", "reason": f"label {name!r} is no longer a finding"}
            )
            continue
        try:
            marked = decode_region(mask, image.width, image.height, settings)
        except RegionError as exc:
            skipped.append({"where": where, "code": exc.code, "reason": str(exc)})
            continue
        if name == IGNORE:
            ignore = marked if ignore is None else ignore | marked
        else:
            k = labels.index(name)
            evidence[k] = marked if k not in evidence else evidence[k] | marked
    attributes = dict(record.attributes)
    patient = attributes.get("patient_id")
    return Example(
        image=image.pixels,
        targets=targets,
        ignore=ignore,
        evidence=evidence,
        key=str(record.task_id),
        # One patient's images stay on one side of the held-out split; a task without a patient id is its own group.
        group=f"patient:{patient}" if patient else f"task:{record.task_id}",
        attributes=attributes,
        skipped=skipped,
    )


def _promotion_decision(
    settings: Settings,
    labels: tuple[str, ...],
    held: list[Example],
    y_true: np.ndarray | None,
    parent_probs: np.ndarray | None,
    new_probs: np.ndarray | None,
    parent_thresholds: Sequence[float] | None,
    thresholds: Sequence[float] | None,
) -> PromotionDecision:
    """The gate on the held-out patients: parent and candidate scored on the same images (train/promotion.py),
    from the probabilities the evaluation already computed."""
    policy = PromotionPolicy(enabled=settings.promotion_gate, min_holdout=settings.promotion_min_holdout)
    default = [settings.threshold] * len(labels)
    if y_true is None or parent_probs is None or new_probs is None:
        empty = np.zeros((0, len(labels)))
        return decide(empty, empty, empty, np.zeros(len(labels)), np.zeros(len(labels)), policy=policy)
    groups, _ = patient_groups([e.attributes for e in held])  # the same groups as the version's metrics
    return decide(
        y_true,
        parent_probs,
        new_probs,
        np.asarray(parent_thresholds or default, dtype=float),
        np.asarray(thresholds if thresholds is not None else default, dtype=float),
        {name: np.asarray(values, dtype=object) for name, values in groups.items()},
        np.array([e.group or e.key for e in held], dtype=object),
        policy,
    )


def example_heatmaps(
    model: torch.nn.Module, held: list[Example], holdout, labels: tuple[str, ...], n: int = 6
) -> bytes:
    """Held-out images with the heatmap of their most probable finding, for the version's report."""
    buffer = io.BytesIO()
    count = min(n, len(held))
    if count == 0:
        np.savez_compressed(
            buffer, images=np.zeros((0, 1, 1)), heatmaps=np.zeros((0, 1, 1)), findings=np.array([]), probs=np.zeros(0)
        )
        return buffer.getvalue()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits, cams = HeatmapExplainer(model.eval()).logits_and_cams(holdout.images[:count].to(device))
    probs = torch.sigmoid(logits).cpu().numpy()
    top = probs.argmax(axis=1)
    maps = normalise_maps(cams.cpu())[torch.arange(count), torch.from_numpy(top)].numpy()
    thumbs = [np.asarray(Image.fromarray((e.image * 255).astype(np.uint8)).resize((128, 128))) for e in held[:count]]
    np.savez_compressed(
        buffer,
        images=np.stack(thumbs),
        heatmaps=maps,
        findings=np.array([labels[k] for k in top]),
        probs=probs[np.arange(count), top],
    )
    return buffer.getvalue()


def evaluate_holdout(
    y_true: np.ndarray, y_prob: np.ndarray, labels: tuple[str, ...], held: list[Example], thresholds: Sequence[float]
) -> VersionMetrics:
    """The shared bias metrics on the held-out annotations: Equalized Odds by sex, age band and site whenever the
    task data has them (bootstrap by patient), and in ``fairness_coverage`` which could not be measured and why."""
    groups, absent = patient_groups([e.attributes for e in held])
    metrics = evaluate_version(
        y_true, y_prob, labels, groups, thresholds=thresholds, cluster_ids=[e.group for e in held], n_boot=100
    )
    metrics["fairness_coverage"] = fairness_coverage(
        metrics, groups, absent, min_group_count=int(metrics["settings"]["min_group_count"])
    )
    return metrics


def build_examples(
    records: list[AnnotationRecord], labels: tuple[str, ...], settings: Settings
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Examples for every usable record, and a skip list with reasons for the rest (never raises)."""

    def one(record: AnnotationRecord) -> Example | Exception:
        try:
            return record_to_example(record, labels, settings, fetcher)
        except (ImageError, ValueError) as exc:
            return exc

    # One fetcher for the job: connections kept alive per host and FETCH_PER_HOST honoured across the threads.
    with ImageFetcher(settings) as fetcher, ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(one, records))
    examples = [o for o in outcomes if isinstance(o, Example)]
    skipped = [
        {"task": r.task_id, "annotation": r.annotation_id, "reason": str(o)}
        for r, o in zip(records, outcomes, strict=True)
        if isinstance(o, Exception)
    ]
    return examples, skipped


def train_project(project: str, settings: Settings | None = None, *, force: bool = False) -> dict[str, Any]:
    """The rq job. Returns a summary (also kept as the job's result)."""
    settings = settings or Settings.from_env()
    conn = connect(settings)
    _progress(stage="waiting for project lock", project=project)
    # Inside: new annotations schedule the next job; everything acknowledged so far is ours.
    with coalesced_run(conn, TRAINING, project, settings):
        store = AnnotationStore(conn, project)
        reconcile_summary = None
        if conn.getdel(key(project, "reconcile")):
            _progress(stage="reconciling with Label Studio")
            reconcile_summary = reconcile_with_label_studio(store, project, settings)
        taken_at = time.time()
        generation, records = store.snapshot()
        snapshot_taken(conn, project, generation, taken_at)  # the retraining policy counts from here
        return _train_snapshot(project, settings, generation, records, force, reconcile_summary)


class _Skip(Exception):
    """A job step found nothing to do; its summary is the job's result."""

    def __init__(self, reason: str, **summary: Any) -> None:
        super().__init__(reason)
        self.summary = {"status": "skipped", "reason": reason, **summary}


@dataclass
class _Evaluation:
    """The candidate on the held-out patients, beside its parent (None without a holdout)."""

    metrics: VersionMetrics | None
    thresholds: Sequence[float] | None
    promotion: PromotionDecision


def _train_snapshot(
    project: str,
    settings: Settings,
    generation: int,
    records: list[AnnotationRecord],
    force: bool,
    reconcile_summary: dict[str, Any] | None,
) -> dict[str, Any]:
    """The job's steps on one snapshot of the annotations: parent, examples, fine-tune, evaluate and gate, save,
    re-rank."""
    started = time.time()
    versions = VersionStore(settings.model_dir)
    try:
        labels, parent = _parent_version(project, settings, versions, generation, records, force)
        _progress(stage="loading images", annotations=len(records))
        examples, skipped = _usable_examples(records, labels, settings)
    except _Skip as skip:
        return skip.summary
    regions_skipped = skipped_regions_summary(examples)
    trained = _fine_tune(project, settings, versions, parent, labels, examples, records, generation)
    evaluation = _evaluate_and_gate(
        settings, labels, parent, trained.held, trained.holdout, trained.model, trained.parent_probs, regions_skipped
    )
    training = {
        "annotations_used": len(trained.train_idx),
        "holdout": len(trained.held),
        "skipped": skipped,
        "regions_skipped": regions_skipped,
        "masked_ignore": int(trained.train_data.has_ignore.sum()),
        "masked_evidence_pairs": int(trained.train_data.has_evidence.sum()),
        "history": trained.run.history,
        "mask_propagation": trained.run.propagation.to_json() if trained.run.propagation else None,
        "decorrelated_pairs": [pair.describe(labels) for pair in trained.run.decorrelated],
        "suggested_ignore": trained.suggested_ignore,
        "config": trained.config.to_json(),
        "duration_s": round(time.time() - started, 2),
        "reconcile": reconcile_summary,
        "task_ids": sorted(r.task_id for r in records),
    }
    info = _save(project, versions, parent, trained, evaluation, generation, training, labels)
    promoted = evaluation.promotion.promote
    ranking_job = None
    # Re-rank the unlabelled tasks only with a version physicians will see.
    if promoted and settings.label_studio_url and settings.label_studio_api_key:
        ranking_job = schedule_ranking(connect(settings), project, info.version, settings=settings)
    return {
        "status": "trained" if promoted else "candidate",
        "promotion": evaluation.promotion.reason,
        "version": info.version,
        "parent": parent.version,
        "annotations": len(examples),
        "skipped": skipped,
        "regions_skipped": regions_skipped,
        "suggested_ignore": trained.suggested_ignore,
        "metrics": {
            "macro_f1": evaluation.metrics["macro_f1"] if evaluation.metrics else None,
            "macro_auroc": evaluation.metrics["macro_auroc"] if evaluation.metrics else None,
        },
        "ranking_job": ranking_job,
    }


@dataclass
class _Trained:
    """What fine-tuning produced, and the split it used."""

    model: torch.nn.Module
    train_idx: list[int]
    held: list[Example]
    train_data: ExampleTensors
    holdout: ExampleTensors
    parent_probs: np.ndarray | None  # the parent's predictions on the holdout, before training
    config: TrainConfig
    run: TrainingRun
    suggested_ignore: dict[str, Any]


def _fine_tune(
    project: str,
    settings: Settings,
    versions: VersionRepository,
    parent: VersionInfo,
    labels: tuple[str, ...],
    examples: list[Example],
    records: list[AnnotationRecord],
    generation: int,
) -> _Trained:
    """Split by patient, fine-tune the parent's weights on the training part (suggested ignore regions the
    physicians deleted are the detector's negatives)."""
    train_idx, holdout_idx = holdout_split(examples, fraction=0.2)
    held = [examples[i] for i in holdout_idx]
    model = model_from_version(parent, versions, pick_device(settings.device))
    input_size = parent.meta.input_size
    mean, std = normalisation(model)
    grid = heatmap_grid(model, input_size)
    train_data = tensorise([examples[i] for i in train_idx], len(labels), input_size, grid, mean, std)
    holdout = tensorise(held, len(labels), input_size, grid, mean, std)
    parent_probs = predict_probabilities(model, holdout.images) if len(holdout) else None

    config = replace(train_config(settings.training), seed=generation)
    train_keys = [examples[i].key for i in train_idx]
    outcomes = suggestion_outcomes(records, SuggestionStore(connect(settings), project))
    rejected = rejected_tensors(outcomes.deleted, train_keys, train_data.images)
    _progress(stage="training", epoch=0, epochs=config.epochs, train=len(train_idx), holdout=len(holdout_idx))
    # The parent's accepted artefact detector stands in where this run's fit declines, if it still passes the
    # gate on this model's features: a declined round that trains on the painted masks alone let the shortcut
    # back (bench/results/rank_ablation_budgets10-20-30-60-120_diversity_off.md, attention_bald_keep_detector).
    previous = load_detector(versions.read_file(parent, DETECTOR_FILE))
    run = fine_tune(
        model, train_data, config, progress=lambda m: _progress(**m), rejected=rejected, previous_detector=previous
    )
    suggested = outcomes.summary({int(k) for k in train_keys if k.isdigit()})
    return _Trained(model, train_idx, held, train_data, holdout, parent_probs, config, run, suggested)


def _save(
    project: str,
    versions: VersionRepository,
    parent: VersionInfo,
    trained: _Trained,
    evaluation: _Evaluation,
    generation: int,
    training: dict[str, Any],
    labels: tuple[str, ...],
) -> VersionInfo:
    """Save the version atomically (live only when the gate promoted it), with its held-out heatmaps and the
    artefact detector for suggested ignore regions."""
    meta = parent.meta.but(
        parent=parent.version,
        kind="fine-tuned",
        created_at=None,
        thresholds=None if evaluation.thresholds is None else tuple(evaluation.thresholds),
        trained_generation=generation,
        training=training,
        metrics=evaluation.metrics,
        promotion=evaluation.promotion.to_json(),
    )
    _progress(stage="saving")
    promoted = evaluation.promotion.promote
    state = {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}
    extra = {"examples.npz": example_heatmaps(trained.model, trained.held, trained.holdout, labels)}
    propagation = trained.run.propagation
    if propagation is not None and propagation.detector is not None:
        extra[DETECTOR_FILE] = propagation.detector.to_bytes()
    info = versions.save_version(project, state, meta, extra_files=extra, make_live=promoted)
    _progress(stage="done", version=info.version, promoted=promoted)
    log.info(
        "project %s: %s %s (parent %s, %d annotations, %d skipped): %s",
        project,
        info.version,
        "is live" if promoted else "kept as a candidate",
        parent.version,
        len(trained.train_idx),
        len(training["skipped"]),
        evaluation.promotion.reason,
    )
    return info


def _parent_version(
    project: str,
    settings: Settings,
    versions: VersionRepository,
    generation: int,
    records: list[AnnotationRecord],
    force: bool,
) -> tuple[tuple[str, ...], VersionInfo]:
    """The project's findings and the live version this job fine-tunes; _Skip when there is nothing to do."""
    config_xml = AnnotationStore(connect(settings), project).label_config()
    if config_xml is None:
        raise _Skip("no label config recorded for the project yet")
    labels = parse_label_config(config_xml).findings
    parent_version = ModelRegistry(settings, versions).ensure_version(project, labels)
    parent = versions.info(project, parent_version)
    if not force and parent.meta.trained_generation == generation:
        raise _Skip(f"no annotation changed since {parent_version}", version=parent_version)
    if not records:
        raise _Skip("empty training set: no usable annotations", version=parent_version)
    return labels, parent


def _usable_examples(
    records: list[AnnotationRecord], labels: tuple[str, ...], settings: Settings
) -> tuple[list[Example], list[dict[str, Any]]]:
    examples, skipped = build_examples(records, labels, settings)
    if not examples:
        raise _Skip("no annotation could be loaded", skipped=skipped)
    return examples, skipped


def _evaluate_and_gate(
    settings: Settings,
    labels: tuple[str, ...],
    parent: VersionInfo,
    held: list[Example],
    holdout: Any,
    model: torch.nn.Module,
    parent_probs: np.ndarray | None,
    regions_skipped: dict[str, Any],
) -> _Evaluation:
    """Per-finding thresholds and the bias metrics on the held-out patients, then the promotion gate."""
    metrics: VersionMetrics | None = None
    thresholds: Sequence[float] | None = parent.meta.thresholds
    y_true: np.ndarray | None = None
    new_probs: np.ndarray | None = None
    if len(holdout):
        _progress(stage="evaluating")
        y_true = holdout.targets.numpy()
        new_probs = predict_probabilities(model, holdout.images)
        if len(holdout) >= 20:  # too few held-out images make per-finding thresholds noise
            thresholds = choose_thresholds(y_true, new_probs).tolist()
        current = thresholds if thresholds is not None else [settings.threshold] * len(labels)
        metrics = evaluate_holdout(y_true, new_probs, labels, held, current)
        parent_thresholds = parent.meta.thresholds or [settings.threshold] * len(labels)
        assert parent_probs is not None  # predicted above whenever there is a holdout
        metrics["parent"] = per_finding_metrics(y_true, parent_probs, labels, parent_thresholds)
        metrics["regions_skipped"] = regions_skipped  # the report states them next to the metrics
    promotion = _promotion_decision(
        settings, labels, held, y_true, parent_probs, new_probs, parent.meta.thresholds, thresholds
    )
    return _Evaluation(metrics, thresholds, promotion)
