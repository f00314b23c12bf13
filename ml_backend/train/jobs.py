"""The rq training job: annotation store -> examples -> fine-tuned model -> new live version."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from rq import get_current_job

from ml_backend.config import Settings
from ml_backend.explain.brush_rle import decode_alpha
from ml_backend.feedback.annotations import IGNORE, AnnotationRecord
from ml_backend.feedback.queue import acquire_project_lock, connect, key, release
from ml_backend.feedback.reconcile import reconcile_with_label_studio
from ml_backend.feedback.store import AnnotationStore
from ml_backend.io.images import ImageError, load_image
from ml_backend.io.label_config import parse_label_config
from ml_backend.measure.metrics import age_bins, choose_thresholds, evaluate_version, per_finding_metrics
from ml_backend.models.classifier import normalisation, pick_device
from ml_backend.models.registry import ModelRegistry, model_from_version
from ml_backend.models.store import VersionStore
from ml_backend.train.examples import Example, holdout_split, tensorise
from ml_backend.train.losses import LossConfig
from ml_backend.train.mask_propagation import PropagationConfig
from ml_backend.train.trainer import TrainConfig, fine_tune, heatmap_grid, predict_probabilities

log = logging.getLogger(__name__)


def train_config_from_env() -> TrainConfig:
    loss = LossConfig(
        prediction=os.environ.get("PRED_LOSS", "wbce"),
        ignore_weight=float(os.environ.get("IGNORE_LOSS_WEIGHT", "0.1")),
        evidence_weight=float(os.environ.get("EVIDENCE_LOSS_WEIGHT", "0.1")),
        counterfactuals=_on(os.environ.get("COUNTERFACTUALS", "1")),
        artefact_paste_rate=float(os.environ.get("ARTEFACT_PASTE_RATE", "0.5")),
    )
    return TrainConfig(
        epochs=int(os.environ.get("TRAIN_EPOCHS", "5")),
        batch_size=int(os.environ.get("TRAIN_BATCH_SIZE", "16")),
        lr=float(os.environ.get("TRAIN_LR", "3e-4")),
        loss=loss,
        propagation=PropagationConfig() if _on(os.environ.get("MASK_PROPAGATION", "1")) else None,
    )


def _on(value: str) -> bool:
    return value.lower() not in ("0", "false", "no", "off")


def _progress(**meta: Any) -> None:
    job = get_current_job()
    log.info("progress %s", meta)
    if job is not None:
        job.meta.update(meta, updated_at=time.time())
        job.save_meta()


def record_to_example(
    record: AnnotationRecord, labels: tuple[str, ...], settings: Settings, http: Any = None
) -> Example:
    """Fetch the image and decode the masks at its natural size; raises ValueError/ImageError with the reason."""
    image = load_image(record.image_ref, settings, http)
    targets = np.array([label in record.positives for label in labels], dtype=np.float32)
    ignore: np.ndarray | None = None
    evidence: dict[int, np.ndarray] = {}
    for mask_key, mask in record.masks.items():
        if (mask.width, mask.height) != (image.width, image.height):
            raise ValueError(
                f"mask {mask_key!r} is {mask.width}x{mask.height} but the image is {image.width}x{image.height}"
            )
        marked = decode_alpha(mask.rle, mask.height, mask.width) > 0
        name = mask_key.split("#", 1)[0]
        if name == IGNORE:
            ignore = marked if ignore is None else ignore | marked
        elif name in labels:
            k = labels.index(name)
            evidence[k] = marked if k not in evidence else evidence[k] | marked
        else:
            raise ValueError(f"mask for unknown finding {name!r}")
    return Example(
        image=image.pixels,
        targets=targets,
        ignore=ignore,
        evidence=evidence,
        key=str(record.task_id),
        group=str(record.task_id),
    )


def example_heatmaps(
    model: torch.nn.Module, held: list[Example], holdout, labels: tuple[str, ...], n: int = 6
) -> bytes:
    """Held-out images with the heatmap of their most probable finding, for the version's report."""
    import io

    from ml_backend.explain.cam import HeatmapExplainer, normalise_maps

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
    y_true: np.ndarray, y_prob: np.ndarray, labels: tuple[str, ...], held: list[Example], thresholds: list[float]
) -> dict[str, Any]:
    """The shared bias metrics on the held-out annotations (groups from task data when present)."""
    groups: dict[str, np.ndarray] = {}
    sexes = [e.attributes.get("sex") for e in held]
    if any(sexes):
        groups["sex"] = np.array([s or "unknown" for s in sexes], dtype=object)
    ages = [e.attributes.get("age") for e in held]
    if any(a is not None for a in ages):
        groups["age"] = age_bins([float(a) if a is not None else np.nan for a in ages])
    return evaluate_version(
        y_true, y_prob, labels, groups, thresholds=thresholds, cluster_ids=[e.group for e in held], n_boot=100
    )


def build_examples(
    records: list[AnnotationRecord], labels: tuple[str, ...], settings: Settings
) -> tuple[list[Example], list[dict[str, Any]]]:
    """Examples for every usable record, and a skip list with reasons for the rest (never raises)."""

    def one(record: AnnotationRecord) -> Example | str:
        try:
            return record_to_example(record, labels, settings)
        except (ImageError, ValueError) as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(one, records))
    examples = [o for o in outcomes if isinstance(o, Example)]
    skipped = [
        {"task": r.task_id, "annotation": r.annotation_id, "reason": o}
        for r, o in zip(records, outcomes, strict=True)
        if isinstance(o, str)
    ]
    return examples, skipped


def train_project(project: str, settings: Settings | None = None, *, force: bool = False) -> dict[str, Any]:
    """The rq job. Returns a summary (also kept as the job's result)."""
    settings = settings or Settings.from_env()
    conn = connect(settings)
    job = get_current_job()
    job_id = job.id if job else f"inline-{os.getpid()}-{time.time()}"
    _progress(stage="waiting for project lock", project=project)
    heartbeat = acquire_project_lock(conn, project, job_id)
    try:
        # From here on, new annotations schedule the next job; everything acknowledged so far is ours.
        release(conn, key(project, "queued"), job_id)
        store = AnnotationStore(conn, project)
        reconcile_summary = None
        if conn.getdel(key(project, "reconcile")):
            _progress(stage="reconciling with Label Studio")
            reconcile_summary = reconcile_with_label_studio(store, project, settings)
        generation, records = store.snapshot()
        return _train_snapshot(project, settings, generation, records, force, reconcile_summary)
    finally:
        heartbeat.set()
        release(conn, key(project, "lock"), job_id)


def _train_snapshot(
    project: str,
    settings: Settings,
    generation: int,
    records: list[AnnotationRecord],
    force: bool,
    reconcile_summary: dict[str, Any] | None,
) -> dict[str, Any]:
    started = time.time()
    versions = VersionStore(settings.model_dir)
    config_xml = AnnotationStore(connect(settings), project).label_config()
    if config_xml is None:
        return {"status": "skipped", "reason": "no label config recorded for the project yet"}
    labels = parse_label_config(config_xml).findings
    registry = ModelRegistry(settings, versions)
    parent_version = registry.ensure_version(project, labels)
    parent = versions.info(project, parent_version)
    if not force and parent.meta.get("trained_generation") == generation:
        return {
            "status": "skipped",
            "reason": f"no annotation changed since {parent_version}",
            "version": parent_version,
        }
    if not records:
        return {"status": "skipped", "reason": "empty training set: no usable annotations", "version": parent_version}

    _progress(stage="loading images", annotations=len(records))
    examples, skipped = build_examples(records, labels, settings)
    if not examples:
        return {"status": "skipped", "reason": "no annotation could be loaded", "skipped": skipped}
    train_idx, holdout_idx = holdout_split(examples, fraction=0.2)

    device = pick_device(settings.device)
    model = model_from_version(parent, versions, device)
    input_size = int(parent.meta.get("input_size", settings.input_size))
    mean, std = normalisation(model)
    grid = heatmap_grid(model, input_size)
    train_data = tensorise([examples[i] for i in train_idx], len(labels), input_size, grid, mean, std)
    holdout = tensorise([examples[i] for i in holdout_idx], len(labels), input_size, grid, mean, std)
    parent_probs = predict_probabilities(model, holdout.images) if len(holdout) else None

    config = train_config_from_env()
    config = replace(config, seed=generation)
    _progress(stage="training", epoch=0, epochs=config.epochs, train=len(train_idx), holdout=len(holdout_idx))
    run = fine_tune(model, train_data, config, progress=lambda m: _progress(**m))

    metrics: dict[str, Any] | None = None
    thresholds = parent.meta.get("thresholds")
    if len(holdout):
        _progress(stage="evaluating")
        held = [examples[i] for i in holdout_idx]
        y_true = holdout.targets.numpy()
        new_probs = predict_probabilities(model, holdout.images)
        if len(holdout) >= 20:  # too few held-out images make per-finding thresholds noise
            thresholds = choose_thresholds(y_true, new_probs).tolist()
        current = thresholds if thresholds is not None else [settings.threshold] * len(labels)
        metrics = evaluate_holdout(y_true, new_probs, labels, held, current)
        parent_thresholds = parent.meta.get("thresholds") or [settings.threshold] * len(labels)
        metrics["parent"] = per_finding_metrics(y_true, parent_probs, labels, parent_thresholds)
    meta = {
        **parent.meta,
        "parent": parent_version,
        "kind": "fine-tuned",
        "created_at": None,
        "thresholds": thresholds,
        "trained_generation": generation,
        "training": {
            "annotations_used": len(train_idx),
            "holdout": len(holdout_idx),
            "skipped": skipped,
            "masked_ignore": int(train_data.has_ignore.sum()),
            "masked_evidence_pairs": int(train_data.has_evidence.sum()),
            "history": run.history,
            "mask_propagation": run.propagation.to_json() if run.propagation else None,
            "config": config.to_json(),
            "duration_s": round(time.time() - started, 2),
            "reconcile": reconcile_summary,
            "task_ids": sorted(r.task_id for r in records),
        },
        "metrics": metrics,
    }
    _progress(stage="saving")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    extra = {"examples.npz": example_heatmaps(model, [examples[i] for i in holdout_idx], holdout, labels)}
    info = versions.save_version(project, state, meta, extra_files=extra)
    _progress(stage="done", version=info.version)
    log.info(
        "project %s: %s is live (parent %s, %d annotations, %d skipped)",
        project,
        info.version,
        parent_version,
        len(train_idx),
        len(skipped),
    )
    ranking_job = None
    if settings.label_studio_url and settings.label_studio_api_key:  # re-rank the unlabelled tasks with it
        from ml_backend.rank.job import schedule_ranking

        ranking_job = schedule_ranking(connect(settings), project, info.version)
    return {
        "status": "trained",
        "version": info.version,
        "parent": parent_version,
        "annotations": len(examples),
        "skipped": skipped,
        "metrics": {k: (metrics or {}).get(k) for k in ("macro_f1", "macro_auroc")},
        "ranking_job": ranking_job,
    }
