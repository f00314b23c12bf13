"""The ranking job: put the unlabelled tasks of a Label Studio project in review order, in Label Studio itself.

Stages (each logged, and kept in the rq job's meta and in Redis ``mdb:<p>:rank`` when Redis is there):

1. read the project (label config -> findings) and load the live model from ``ModelRegistry``;
2. list the tasks (minimal fields, paged); candidates are tasks nobody annotated or skipped;
3. predict the candidates in batches with ``TaskImageLoader.load_all`` + ``run_model``; each batch's compact
   outputs (probabilities, CAMs, pooled features, image size) go to a checkpoint (``rank/checkpoint.py``) under
   ``MODEL_DIR/projects/<p>/ranking/<version>/``, so a rerun predicts only what is missing;
4. priors from the annotations so far (the backend's annotation store, else Label Studio): label counts,
   co-occurrence, the ignore-mask prior;
5. rank every candidate (``rank_candidates``) and save the ranking (``rank/records.py``) before anything is
   written;
6. write, top of the queue first, in chunks, one prediction per task (``/predict``'s result format, heatmaps
   included) whose ``score`` is ``1 - rank / N`` and whose findings result carries ``ranking`` (rank, reason,
   signals): a task that already holds a prediction of this version (opened meanwhile, or ranked before) has
   it updated in place, the others get theirs bulk-imported; nothing is deleted, so no task is ever without
   a prediction of the version. The reason also goes into the read-only summary text the physician sees
   (``inference/summary.py``), and rank, priority, reason and probabilities into the task's data, as Data
   Manager columns (``rank/columns.py``; annotated tasks lose their rank and reason);
7. point the project at the version (the "Prediction score" column averages only that version's scores) and
   create or fix the "Review queue" tab ordered by prediction score.

Why this order is safe to interrupt: all scores exist before the first write; until step 7 the project keeps
pointing at the previous version, so the queue follows the previous ranking; a rerun reuses the saved ranking
and continues at the first unwritten chunk. Re-ranking a version the project already points at (``force``)
rewrites scores task by task, top first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.config import Settings
from ml_backend.feedback.annotations import AnnotationError, AnnotationRecord, parse_annotation
from ml_backend.feedback.queue import RANKING, coalesced_run, connect, schedule
from ml_backend.feedback.store import AnnotationStore
from ml_backend.inference.model_outputs import run_model
from ml_backend.inference.task_images import TaskImageLoader
from ml_backend.io.images import LoadedImage
from ml_backend.io.label_config import LabelConfigError, ProjectSchema, parse_label_config
from ml_backend.io.label_studio import (
    ProjectNotFound,
    client_from_settings,
    import_predictions,
    list_project_tasks,
    project_ranking_settings,
    read_project,
    set_project_model_version,
    set_review_view,
    task_annotations,
    update_version_predictions,
)
from ml_backend.models.registry import LoadedModel, ModelRegistry
from ml_backend.models.store import VersionStore, project_key
from ml_backend.rank.checkpoint import RankCheckpoint, TaskOutput
from ml_backend.rank.columns import (
    ColumnOwnership,
    clear_queue_columns,
    column_types,
    review_columns,
    write_review_columns,
)
from ml_backend.rank.priors import Priors, priors_from_records
from ml_backend.rank.progress import Progress
from ml_backend.rank.records import (
    RankedPrediction,
    RankingItem,
    SavedRanking,
    priors_summary,
    ranked_prediction,
    ranking_key,
    saved_ranking,
)
from ml_backend.rank.strategy import RankConfig, RankedItem, RankInputs, mc_probabilities_from_features, rank_candidates
from ml_backend.train.suggestions import DETECTOR_FILE, Suggester

log = logging.getLogger(__name__)

JOB_FUNCTION = "ml_backend.rank.job.rank_project_job"

__all__ = [
    "JOB_FUNCTION",
    "RankCheckpoint",
    "RankError",
    "RankOptions",
    "TaskOutput",
    "describe",
    "load_rank_config",
    "rank_project",
    "rank_project_job",
    "schedule_ranking",
]


class RankError(RuntimeError):
    """The project cannot be ranked (no tasks, no findings, no model, ...); nothing was written."""


class _NothingToRank(Exception):
    """A step found nothing to rank; the job ends "skipped" with this reason (nothing written)."""

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.reason, self.extra = reason, extra


@dataclass
class RankOptions:
    strategy: str | None = None  # overrides the configured strategy
    config_path: str | None = None  # default: $RANKING_CONFIG
    batch_size: int | None = None  # images per model batch (default PREDICT_BATCH_SIZE)
    write_batch: int | None = None  # predictions per Label Studio import call (default RANK_WRITE_BATCH)
    limit: int | None = None  # rank at most this many candidates (lowest task ids first)
    force: bool = False  # recompute the ranking even if a saved one matches
    dry_run: bool = False  # rank and report, write nothing
    set_view: bool = True


def load_rank_config(
    path: str | Path | None = None,
    project_overrides: dict[str, Any] | None = None,
    strategy: str | None = None,
    settings: Settings | None = None,
) -> RankConfig:
    """Defaults < file (``path`` or $RANKING_CONFIG) < the project's settings < the command line."""
    chosen = Path(path) if path else (settings or Settings.from_env()).ranking.config_path
    config = RankConfig.from_file(chosen) if chosen else RankConfig()
    config = config.merged(project_overrides)
    return config.merged({"strategy": strategy}) if strategy else config


# ------------------------------------------------------------------------------------------------ the job
@dataclass
class _Run:
    """One ranking: what it was given, and what it counts as it goes."""

    project_id: int
    project: str
    settings: Settings
    options: RankOptions
    client: Any
    registry: ModelRegistry
    conn: Any
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    columns: dict[str, int] = field(
        default_factory=lambda: {"written": 0, "failed": 0, "cleared": 0, "user_fields_kept": 0}
    )
    _ownership: ColumnOwnership | None = None

    @property
    def ownership(self) -> ColumnOwnership:
        """Which task-data keys this backend wrote (rank/columns.py), read once per job."""
        if self._ownership is None:
            path = Path(self.settings.model_dir) / "projects" / self.project / "review_columns.json"
            self._ownership = ColumnOwnership(path)
        return self._ownership

    def timed(self, name: str, started: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 3)

    @property
    def write_batch(self) -> int:
        return max(1, self.options.write_batch or self.settings.ranking.write_batch)


def rank_project(
    project: int | str,
    settings: Settings | None = None,
    options: RankOptions | None = None,
    *,
    client: Any = None,
    registry: ModelRegistry | None = None,
    conn: Any = None,
) -> dict[str, Any]:
    """Rank project ``project``'s unlabelled tasks in Label Studio; returns a summary.

    Raises RankError (bad project, no findings) or LabelStudioError (Label Studio unreachable) before anything
    is written. An error while writing leaves the project on its previous model version; a rerun resumes.
    ``registry`` lets a serving process reuse its loaded live model; ``conn`` (Redis) adds progress in
    ``mdb:<p>:rank`` and priors from the backend's annotation store.
    """
    settings = settings or Settings.from_env()
    options = options or RankOptions()
    try:
        project_id = int(str(project).split(".", 1)[0])
    except ValueError:
        raise RankError(f"a Label Studio project id is a number, got {project!r}") from None
    if client is None:
        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise RankError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to rank a project's tasks")
        client = client_from_settings(settings)
    key = project_key(project_id)
    registry = registry or ModelRegistry(settings, VersionStore(settings.model_dir))
    run = _Run(project_id, key, settings, options, client, registry, conn, Progress(key, conn))
    return _rank(run)


def _rank(run: _Run) -> dict[str, Any]:
    """The steps, in order; each one below is a function of its own."""
    started = time.perf_counter()
    schema, config = _read_project(run)
    loaded = run.registry.get(run.project, schema.findings)
    version = loaded.version
    checkpoint = RankCheckpoint(run.settings.model_dir, run.project, version)
    suggester = _suggester(run, loaded)  # one per job: it records in _predict what _write offers
    try:
        candidates, labelled = _list_candidates(run, version)
        outputs = _predict(run, loaded, schema, candidates, checkpoint, suggester)
        ranking = _rank_or_reuse(run, config, loaded, schema, candidates, labelled, outputs, checkpoint)
    except _NothingToRank as nothing:
        return _done(run, "skipped", version, reason=nothing.reason, **nothing.extra)
    found = _ranking_summary(run, ranking, len(candidates))
    if run.options.dry_run:
        return _done(run, "dry-run", version, started=started, **found)
    written, updated = _write(run, loaded, schema, ranking, checkpoint, outputs, suggester)
    _clear_columns(run, labelled)
    _compact_ownership(run)
    switched, view_id = _switch(run, version, loaded.labels)
    if view_id is not None or switched:
        checkpoint.prune_other_versions()
    return _done(
        run,
        "ranked",
        version,
        started=started,
        written=written,
        updated_in_place=updated,
        model_version_set=switched,
        view_id=view_id,
        review_columns=run.columns,
        **found,
    )


def _read_project(run: _Run) -> tuple[ProjectSchema, RankConfig]:
    """Step 1: the project's findings (its label config) and the ranking config for it."""
    run.progress(stage="reading project")
    try:
        project = read_project(run.client, run.project_id)
    except ProjectNotFound as exc:
        raise RankError(str(exc)) from exc
    try:
        schema = parse_label_config(project.label_config or "")
    except LabelConfigError as exc:
        raise RankError(f"project {run.project_id}: label config unusable for ranking: {exc}") from exc
    overrides = project_ranking_settings(run.client, run.project_id)
    config = load_rank_config(run.options.config_path, overrides, run.options.strategy, settings=run.settings)
    unknown = config.unknown_findings(schema.findings)
    if unknown:
        log.warning("project %s: ranking config weights findings it does not have: %s", run.project, unknown)
    return schema, config


def _list_candidates(run: _Run, version: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Step 2: (candidates: tasks nobody annotated or skipped, lowest id first; annotated tasks)."""
    t0 = time.perf_counter()
    run.progress(stage="listing tasks", version=version)
    tasks = list_project_tasks(run.client, run.project_id)
    run.timed("list", t0)
    if not tasks:
        raise _NothingToRank(f"project {run.project_id} has no tasks")
    # The listing is the whole project (a failed page raises), so a task missing from it was deleted; its
    # entry leaves the record the next time the record is saved.
    forgotten = run.ownership.forget_absent(int(t["id"]) for t in tasks)
    if forgotten:
        log.info("project %s: review-column record forgets %d deleted tasks", run.project, forgotten)
    candidates = [t for t in tasks if not t.get("total_annotations") and not t.get("cancelled_annotations")]
    labelled = [t for t in tasks if t.get("total_annotations")]
    candidates.sort(key=lambda t: int(t["id"]))
    if run.options.limit is not None:
        candidates = candidates[: max(0, run.options.limit)]
    if not candidates:
        raise _NothingToRank("every task is annotated or skipped: nothing to rank")
    return candidates, labelled


def _predict(
    run: _Run,
    loaded: LoadedModel,
    schema: ProjectSchema,
    candidates: Sequence[dict[str, Any]],
    checkpoint: RankCheckpoint,
    suggester: Suggester,
) -> dict[int, TaskOutput]:
    """Step 3: model outputs for every candidate whose image loads; reuses the checkpoint, saves each batch."""
    t0 = time.perf_counter()
    wanted = {int(t["id"]) for t in candidates}
    outputs = {i: o for i, o in checkpoint.load_outputs(loaded.labels).items() if i in wanted}
    missing = [t for t in candidates if int(t["id"]) not in outputs]
    run.progress(stage="predicting", done=len(outputs), total=len(candidates), reused=len(outputs))
    loader = TaskImageLoader(run.settings)
    batch_size = run.options.batch_size or run.settings.predict_batch_size
    chunk = max(batch_size, 32)  # images fetched concurrently per step
    try:
        for start in range(0, len(missing), chunk):
            batch = missing[start : start + chunk]
            images = loader.load_all(batch, schema)
            good = [(t, img) for t, img in zip(batch, images, strict=True) if isinstance(img, LoadedImage)]
            for task, img in zip(batch, images, strict=True):
                if not isinstance(img, LoadedImage):
                    run.skipped.append({"task": int(task["id"]), "reason": str(img)})
            if good:
                out = run_model(loaded, [img.pixels for _, img in good], batch_size)
                cams, feats = out.cams.numpy(), out.features.numpy()
                new = [
                    TaskOutput(int(t["id"]), out.probabilities[i], cams[i], feats[i], img.width, img.height)
                    for i, (t, img) in enumerate(good)
                ]
                checkpoint.save_outputs(new, loaded.labels)  # a cache of model outputs, even on a dry run
                suggester.record([o.task_id for o in new], [img.pixels for _, img in good])
                outputs.update((o.task_id, o) for o in new)
            run.progress(force_log=False, stage="predicting", done=len(outputs), total=len(candidates))
    finally:
        loader.close()
    run.timed("predict", t0)
    run.progress(stage="predicted", done=len(outputs), total=len(candidates), failed=len(run.skipped))
    if not outputs:
        raise _NothingToRank("no candidate image could be loaded", candidates=len(candidates))
    return outputs


def _rank_or_reuse(
    run: _Run,
    config: RankConfig,
    loaded: LoadedModel,
    schema: ProjectSchema,
    candidates: Sequence[dict[str, Any]],
    labelled: Sequence[dict[str, Any]],
    outputs: dict[int, TaskOutput],
    checkpoint: RankCheckpoint,
) -> SavedRanking:
    """Steps 4-5: the saved ranking when version, config and candidates are the same, else priors + a new
    ranking, saved before anything is written."""
    task_ids = [int(t["id"]) for t in candidates if int(t["id"]) in outputs]
    key = ranking_key(loaded.version, config, task_ids)
    saved = checkpoint.load_ranking()
    if saved is not None and saved.get("key") == key and not run.options.force:
        run.progress(stage="reusing saved ranking", tasks=len(saved["items"]))
        return saved
    t0 = time.perf_counter()
    run.progress(stage="ranking", tasks=len(task_ids))
    priors, source = _priors(run, schema, labelled, outputs)
    items = _rank_outputs(config, loaded, [outputs[t] for t in task_ids], priors)
    ranking = saved_ranking(
        key, loaded.version, config, task_ids, items, priors_summary(priors, schema.findings, source)
    )
    run.timed("rank", t0)
    if not run.options.dry_run:
        checkpoint.save_ranking(ranking)
    return ranking


def _ranking_summary(run: _Run, ranking: SavedRanking, n_candidates: int) -> dict[str, Any]:
    predict_rank_s = run.timings.get("predict", 0.0) + run.timings.get("rank", 0.0)
    return {
        "ranked": len(ranking["items"]),
        "candidates": n_candidates,
        "strategy": ranking["strategy"],
        "priors": ranking.get("priors"),
        "top": ranking["items"][:10],
        "predict_rank_tasks_per_s": round(len(ranking["items"]) / predict_rank_s, 2) if predict_rank_s else None,
    }


def _done(run: _Run, status: str, version: str, started: float | None = None, **extra: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {"status": status, "project": run.project_id, "version": version, **extra}
    summary["skipped"] = run.skipped
    summary["seconds"] = dict(run.timings)
    if started is not None:
        total = time.perf_counter() - started
        summary["seconds"]["total"] = round(total, 3)
        if extra.get("ranked"):
            summary["tasks_per_s"] = round(extra["ranked"] / total, 2)
    run.progress(stage="done" if status == "ranked" else status, **{k: v for k, v in summary.items() if k != "top"})
    return summary


def _priors(
    run: _Run, schema: ProjectSchema, labelled: Sequence[dict[str, Any]], outputs: dict[int, TaskOutput]
) -> tuple[Priors, str]:
    """From the backend's annotation store when it holds anything (what the model trains on), else read from
    Label Studio."""
    grid = next(iter(outputs.values())).cams.shape[1:]
    records: list[AnnotationRecord] = []
    source = "none"
    if run.conn is not None:
        try:
            _, records = AnnotationStore(run.conn, run.project).snapshot()
            source = "annotation store"
        except Exception as exc:
            log.warning("project %s: annotation store unreadable, using Label Studio: %s", run.project, exc)
    if not records and labelled:
        records = _labelled_records(run, labelled, schema)
        source = "label studio"
    priors = priors_from_records(records, schema.findings, (int(grid[0]), int(grid[1])))
    run.skipped.extend(priors.skipped)
    return priors, source if records else "none"


def _labelled_records(run: _Run, labelled: Sequence[dict[str, Any]], schema: ProjectSchema) -> list[AnnotationRecord]:
    """The latest usable annotation of each labelled task, read from Label Studio (one call per task)."""

    def one(task: dict[str, Any]) -> AnnotationRecord | None:
        try:
            annotations = task_annotations(run.client, int(task["id"]))
        except Exception as exc:
            log.warning("task %s: annotations not readable for the priors: %s", task["id"], exc)
            return None
        for annotation in sorted(annotations, key=lambda a: str(a.get("updated_at") or ""), reverse=True):
            try:
                record = parse_annotation(run.project, annotation, task, schema)
            except AnnotationError as exc:
                log.info("task %s: annotation %s not used for the priors: %s", task["id"], annotation.get("id"), exc)
                continue
            if record is not None:
                return record
        return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [r for r in pool.map(one, labelled) if r is not None]


def _rank_outputs(
    config: RankConfig, loaded: LoadedModel, outputs: Sequence[TaskOutput], priors: Priors
) -> list[RankedItem]:
    probabilities = np.stack([o.probabilities for o in outputs]).astype(np.float32)
    features = np.stack([o.features for o in outputs]).astype(np.float32)
    mc = None
    head = loaded.explainer.classifier
    wants_mc = config.strategy == "bald" or (config.strategy == "bias" and config.signal_weights["epistemic"] > 0)
    if config.strategy == "bald" and head is None:
        raise RankError("the BALD baseline needs an avg-pool + linear head (resnet, densenet, convnext, ...)")
    if wants_mc and head is not None:
        # dropout on the pooled features the predictor already computed: T small matrix products, no forward
        rate = float(getattr(loaded.model, "drop_rate", 0.0) or 0.0) or config.mc_dropout
        mc = mc_probabilities_from_features(features, head, config.mc_passes, rate, config.seed)
    inputs = RankInputs(
        probabilities=probabilities,
        labels=loaded.labels,
        cams=np.stack([o.cams for o in outputs]).astype(np.float32),
        features=features,
        mc_probabilities=mc,
        label_counts=priors.label_counts if priors.n_annotated else None,
        n_annotated=priors.n_annotated,
        cooccurrence=priors.cooccurrence if priors.n_annotated else None,
        ignore_prior=priors.ignore_prior,
    )
    return rank_candidates(inputs, config)


def _versions(task: dict[str, Any]) -> set[str]:
    raw = task.get("predictions_model_versions") or ""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return {str(v).strip() for v in items if str(v).strip()}


def _write(
    run: _Run,
    loaded: LoadedModel,
    schema: ProjectSchema,
    ranking: SavedRanking,
    checkpoint: RankCheckpoint,
    outputs: dict[int, TaskOutput],
    suggester: Suggester,
) -> tuple[int, int]:
    """Step 6: the predictions, top of the queue first; resumes after the last chunk a previous run finished."""
    t0 = time.perf_counter()
    items = ranking["items"]
    progress = checkpoint.progress()
    first = int(progress.get("written", 0)) if progress.get("key") == ranking["key"] else 0
    if progress.get("key") == ranking["key"] and progress.get("done"):
        first = len(items)
    run.progress(stage="writing predictions", written=first, total=len(items))
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="rank-write")  # heatmap encoding
    updated = 0
    written = first
    try:
        for start in range(first, len(items), run.write_batch):
            updated += _write_chunk(
                run, loaded, schema, ranking, items[start : start + run.write_batch], outputs, pool, suggester
            )
            written = min(start + run.write_batch, len(items))
            checkpoint.save_progress(ranking["key"], written=written, done=False)
            run.progress(force_log=False, stage="writing predictions", written=written, total=len(items))
    finally:
        pool.shutdown(wait=False)
    checkpoint.save_progress(ranking["key"], written=len(items), done=True)
    run.timed("write", t0)
    return written - first, updated


def _write_chunk(
    run: _Run,
    loaded: LoadedModel,
    schema: ProjectSchema,
    ranking: SavedRanking,
    chunk: Sequence[RankingItem],
    outputs: dict[int, TaskOutput],
    pool: ThreadPoolExecutor,
    suggester: Suggester,
) -> int:
    """One chunk's predictions and Data Manager columns; returns how many were updated in place."""
    version = ranking["version"]
    # Re-read the chunk's tasks: a physician may have opened one (creating a prediction of this version through
    # /predict) or a task may be gone since the listing.
    current = {int(t["id"]): t for t in list_project_tasks(run.client, run.project_id, [i["task"] for i in chunk])}
    run.skipped.extend(
        {"task": i["task"], "reason": "task deleted during ranking"} for i in chunk if i["task"] not in current
    )
    chunk = [i for i in chunk if i["task"] in current]
    has_own = {i["task"] for i in chunk if version in _versions(current[i["task"]])}

    def build(item: RankingItem) -> RankedPrediction:
        o = outputs[item["task"]]
        prediction = ranked_prediction(
            run.settings.heatmap, schema, loaded, o.probabilities, o.cams, o.width, o.height, item, ranking["strategy"]
        )
        suggester.add(prediction["result"], schema, o.task_id, o.width, o.height)
        return prediction

    payload = list(pool.map(build, chunk))
    fresh = [dict(p) for p in payload if p["task"] not in has_own]
    left = update_version_predictions(run.client, [dict(p) for p in payload if p["task"] in has_own], version)
    import_predictions(run.client, run.project_id, fresh + left)  # `left`: its prediction went away meanwhile
    _write_columns(run, chunk, loaded.labels, outputs)
    return len(payload) - len(fresh) - len(left)


def _suggester(run: _Run, loaded: LoadedModel) -> Suggester:
    """Suggested ignore regions (train/suggestions.py) from the version's artefact detector, if it has one."""
    store = run.registry.store
    detector = store.read_file(store.info(run.project, loaded.version), DETECTOR_FILE) if run.conn is not None else None
    return Suggester(run.conn, run.project, loaded, detector)


def _write_columns(
    run: _Run, chunk: Sequence[RankingItem], labels: Sequence[str], outputs: dict[int, TaskOutput]
) -> None:
    """The chunk's Data Manager columns (rank, priority, reason, probabilities) into its tasks' data."""
    t0 = time.perf_counter()
    values = {item["task"]: review_columns(item, labels, outputs[item["task"]].probabilities) for item in chunk}
    done = write_review_columns(run.client, run.project_id, values, run.ownership)
    run.columns["written"] += done.written
    run.columns["failed"] += done.failed
    run.columns["user_fields_kept"] += done.user_fields_kept
    run.timed("columns", t0)


def _clear_columns(run: _Run, labelled: Sequence[dict[str, Any]]) -> None:
    """Annotated tasks are out of the queue: their rank and reason columns go."""
    t0 = time.perf_counter()
    done = clear_queue_columns(run.client, run.project_id, labelled, run.ownership)
    run.columns["cleared"] += done.written
    run.columns["failed"] += done.failed
    run.timed("columns", t0)


def _compact_ownership(run: _Run) -> None:
    """Fold the chunks' journal of column claims into the record (rank/columns.py); if this fails, the next
    job's first save does it."""
    try:
        run.ownership.compact()
    except OSError as exc:
        log.warning("project %s: %s not compacted: %s", run.project_id, run.ownership.path, exc)


def _switch(run: _Run, version: str, labels: Sequence[str]) -> tuple[bool, int | None]:
    """Step 7: point the project at ``version`` and fix the review tab -- unless a newer version went live
    meanwhile (its own ranking job will switch; switching back to this one would undo it)."""
    live = run.registry.store.live_version(run.project)
    if live is not None and live != version:
        log.info("project %s: %s is live now; leaving the project's model version to its ranking", run.project, live)
        return False, None
    run.progress(stage="switching project model version", version=version)
    changed = set_project_model_version(run.client, run.project_id, version)
    types = column_types(labels)
    view_id = set_review_view(run.client, run.project_id, column_types=types)[0] if run.options.set_view else None
    return changed, view_id


# ------------------------------------------------------------------------------------------------ rq
def schedule_ranking(
    conn: Any,
    project: str,
    version: str | None = None,
    *,
    reason: str = "new model version",
    settings: Settings | None = None,
) -> str | None:
    """Enqueue a ranking job unless one is already queued for the project (it ranks the version live when it
    starts). Returns the job id, or None."""
    return schedule(conn, RANKING, project, version, reason=reason, meta={"version": version}, settings=settings)


def rank_project_job(project: str, version: str | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """The rq job: one ranking per project at a time (its own lock: ranking never waits for a training job,
    nor blocks one); ranks the live version."""
    settings = settings or Settings.from_env()
    conn = connect(settings)
    with coalesced_run(conn, RANKING, project, settings):
        live = VersionStore(settings.model_dir).live_version(project)
        if version is not None and live is not None and live != version:
            log.info("project %s: ranking %s instead of %s (a newer version went live)", project, live, version)
        try:
            return rank_project(project, settings, conn=conn)
        except RankError as exc:
            log.warning("project %s: ranking skipped: %s", project, exc)
            return {"status": "skipped", "reason": str(exc)}


def describe(summary: dict[str, Any], top: int = 10) -> str:
    """A few human-readable lines for the command line."""
    lines = [
        f"project {summary.get('project')}: {summary.get('status')} (version {summary.get('version')}, "
        f"{summary.get('ranked', 0)} ranked, {len(summary.get('skipped') or [])} skipped)"
    ]
    if summary.get("reason"):
        lines.append(f"  reason: {summary['reason']}")
    for item in (summary.get("top") or [])[:top]:
        lines.append(f"  #{item['rank']:<4} task {item['task']:<8} score {item['score']:.4f}  {item['reason']}")
    for skip in (summary.get("skipped") or [])[:top]:
        lines.append(f"  skipped task {skip.get('task')}: {skip.get('reason')}")
    return "\n".join(lines)
