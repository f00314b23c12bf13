"""Model versions on disk: one folder per version, written atomically, and a ``live`` pointer per project.

Layout: ``MODEL_DIR/projects/<project>/versions/<version>/{model.pt, meta.json}`` and
``MODEL_DIR/projects/<project>/live`` (the live version's name). Untrained starting weights are written once
to ``MODEL_DIR/shared/<key>.pt`` and hard-linked into each project's ``v0``, so a new project costs no copy.
A version folder is assembled under a temporary name and renamed into place, and ``live`` is replaced with
``os.replace``: a job killed at any point leaves either no new version or a complete one, never a
half-written version live.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from ml_backend.measure.payloads import VersionMetrics

_VERSION = re.compile(r"^v(\d+)$")


class VersionNotFound(LookupError):
    pass


class StorageQuotaExceeded(RuntimeError):
    """Writing another version would take the model folder past ``MAX_MODEL_DIR_BYTES``."""


@dataclass(frozen=True)
class VersionMeta:
    """A version's ``meta.json``: the one place its keys are named. Keys this code does not know (written by a
    newer or older release) are kept in ``extra`` and written back unchanged."""

    backbone: str
    labels: tuple[str, ...]
    input_size: int
    output_stride: int = 32
    pretrained: str | None = None
    kind: str = "initial"  # initial | label-set-change | fine-tuned | demo-bootstrap
    parent: str | None = None
    version: str = ""  # set by VersionStore.save_version
    project: str = ""
    created_at: str | None = None
    thresholds: tuple[float, ...] | None = None  # per finding; None = THRESHOLD for all
    trained_generation: int | None = None  # the annotation store generation it was trained on
    training: dict[str, Any] | None = None  # what the job did (counts, history, config, skipped regions)
    metrics: VersionMetrics | None = None  # measure/metrics.py's payload on the held-out patients (as stored)
    promotion: dict[str, Any] | None = None  # train/promotion.py's decision and its numbers
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> VersionMeta:
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known}
        values["labels"] = tuple(values.get("labels") or ())
        if values.get("thresholds") is not None:
            values["thresholds"] = tuple(float(t) for t in values["thresholds"])
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in fields(self):
            if f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def summary(self) -> dict[str, Any]:
        """One line's worth for /versions and ``medebiaser versions``."""
        training, promotion = self.training or {}, self.promotion or {}
        metrics = self.metrics
        return {
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "kind": self.kind,
            "annotations": training.get("annotations_used"),
            "macro_f1": metrics.get("macro_f1") if metrics else None,
            "macro_auroc": metrics.get("macro_auroc") if metrics else None,
            # A version the promotion gate kept back says why; `medebiaser activate` can still make it live.
            "promoted": promotion.get("promote"),
            "promotion": promotion.get("reason"),
        }

    def but(self, **changes: Any) -> VersionMeta:
        """A copy with ``changes`` (dataclasses.replace)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class VersionInfo:
    project: str
    version: str
    path: Path
    meta: VersionMeta


def _read_meta(version_dir: Path) -> VersionMeta:
    return VersionMeta.from_json(json.loads((version_dir / "meta.json").read_text()))


def project_key(project: Any) -> str:
    """Label Studio names a project ``"<id>.<created_at>"`` in ML requests and ``{"id": ...}`` in webhooks."""
    if isinstance(project, dict):
        project = project.get("id")
    if project is None or project == "":
        return "default"
    text = str(project).split(".", 1)[0].strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise ValueError(f"invalid project identifier {project!r}")
    return text


class VersionRepository(Protocol):
    """What the loop needs from wherever versions live. ``VersionStore`` keeps them in ``MODEL_DIR`` (below); a
    store on shared or object storage implements the same methods (each version written whole, then made live
    by one atomic step), and nothing else reads a version's files."""

    def live_version(self, project: str) -> str | None: ...

    def list_versions(self, project: str) -> list[VersionInfo]: ...

    def projects(self) -> list[str]: ...

    def info(self, project: str, version: str) -> VersionInfo: ...

    def load_state(self, info: VersionInfo) -> dict[str, torch.Tensor]: ...

    def read_file(self, info: VersionInfo, name: str) -> bytes | None: ...

    def save_version(
        self,
        project: str,
        state_dict: dict[str, torch.Tensor],
        meta: VersionMeta,
        *,
        version: str | None = None,
        make_live: bool = True,
        extra_files: dict[str, bytes] | None = None,
        shared_key: str | None = None,
    ) -> VersionInfo: ...

    def set_live(self, project: str, version: str) -> None: ...

    def disk_usage(self) -> int: ...


class VersionStore:
    """Versions in ``MODEL_DIR/projects/<p>/versions/v<n>/`` (``model.pt``, ``meta.json``, extra files), the live
    one named in ``MODEL_DIR/projects/<p>/live``; weights shared by many projects once in ``MODEL_DIR/shared/``."""

    def __init__(self, model_dir: Path, max_bytes: int | None = None) -> None:
        self.root = Path(model_dir) / "projects"
        self.shared_dir = Path(model_dir) / "shared"
        self.max_bytes = max_bytes

    def disk_usage(self) -> int:
        """Bytes under the model folder, each hard-linked file counted once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for folder in (self.root, self.shared_dir):
            if not folder.is_dir():
                continue
            for path in folder.rglob("*"):
                try:
                    stat = path.lstat()
                except FileNotFoundError:  # a staging folder renamed meanwhile
                    continue
                if path.is_file() and (stat.st_dev, stat.st_ino) not in seen:
                    seen.add((stat.st_dev, stat.st_ino))
                    total += stat.st_size
        return total

    def _check_quota(self) -> None:
        if self.max_bytes is None:
            return
        used = self.disk_usage()
        if used >= self.max_bytes:
            raise StorageQuotaExceeded(
                f"the model folder holds {used} bytes, at or above MAX_MODEL_DIR_BYTES ({self.max_bytes}):"
                " delete old versions or raise the cap"
            )

    def project_dir(self, project: str) -> Path:
        return self.root / project

    def live_version(self, project: str) -> str | None:
        try:
            name = (self.project_dir(project) / "live").read_text().strip()
        except FileNotFoundError:
            return None
        return name if (self.project_dir(project) / "versions" / name / "meta.json").is_file() else None

    def list_versions(self, project: str) -> list[VersionInfo]:
        folder = self.project_dir(project) / "versions"
        if not folder.is_dir():
            return []
        infos = []
        for path in folder.iterdir():
            match = _VERSION.match(path.name)
            if match and (path / "meta.json").is_file():
                infos.append(VersionInfo(project, path.name, path, _read_meta(path)))
        return sorted(infos, key=lambda info: int(info.version[1:]))  # names matched _VERSION: v<n>

    def projects(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def info(self, project: str, version: str) -> VersionInfo:
        path = self.project_dir(project) / "versions" / version
        if not (path / "meta.json").is_file():
            raise VersionNotFound(f"project {project} has no version {version!r}")
        return VersionInfo(project, version, path, _read_meta(path))

    def load_state(self, info: VersionInfo) -> dict[str, torch.Tensor]:
        return torch.load(info.path / "model.pt", map_location="cpu", weights_only=True)

    def read_file(self, info: VersionInfo, name: str) -> bytes | None:
        """One of the files saved with the version (``extra_files`` of ``save_version``); None if it has none."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a version file name: {name!r}")
        try:
            return (info.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def save_version(
        self,
        project: str,
        state_dict: dict[str, torch.Tensor],
        meta: VersionMeta,
        *,
        version: str | None = None,
        make_live: bool = True,
        extra_files: dict[str, bytes] | None = None,
        shared_key: str | None = None,
    ) -> VersionInfo:
        """Write a complete version folder atomically; ``version=None`` takes the next free ``v<n>``.

        ``shared_key`` names weights that many projects start from (untrained or pretrained, same label count):
        they are stored once under ``shared/`` and hard-linked, falling back to a copy across file systems.
        """
        self._check_quota()
        versions_dir = self.project_dir(project) / "versions"
        versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=versions_dir))
        try:
            if shared_key is None:
                torch.save(state_dict, staging / "model.pt")
            else:
                shared = self._shared_state(shared_key, state_dict)
                try:
                    os.link(shared, staging / "model.pt")
                except OSError:
                    shutil.copyfile(shared, staging / "model.pt")
            for name, payload in (extra_files or {}).items():
                (staging / name).write_bytes(payload)
            for _attempt in range(100):
                name = version or self._next_name(versions_dir)
                full_meta = meta.but(version=name, project=project, created_at=meta.created_at or _utc_now())
                write_atomic(staging / "meta.json", json.dumps(full_meta.to_json(), indent=2).encode())
                _fsync_dir(staging)
                try:
                    os.rename(staging, versions_dir / name)  # atomic; fails if the name was taken meanwhile
                except OSError:
                    if version is not None:
                        raise FileExistsError(f"version {version} already exists in project {project}") from None
                    continue
                info = VersionInfo(project, name, versions_dir / name, full_meta)
                if make_live:
                    self.set_live(project, name)
                return info
            raise RuntimeError("could not allocate a version name")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _shared_state(self, shared_key: str, state_dict: dict[str, torch.Tensor]) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", shared_key):
            raise ValueError(f"invalid shared weights key {shared_key!r}")
        path = self.shared_dir / f"{shared_key}.pt"
        if not path.is_file():
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            write_atomic(path, buffer.getvalue())  # racing processes write identical bytes; os.replace wins once
        return path

    def set_live(self, project: str, version: str) -> None:
        self.info(project, version)  # raises VersionNotFound
        write_atomic(self.project_dir(project) / "live", version.encode())

    @staticmethod
    def _next_name(versions_dir: Path) -> str:
        numbers = [int(m.group(1)) for p in versions_dir.iterdir() if (m := _VERSION.match(p.name))]
        return f"v{max(numbers, default=-1) + 1}"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
