"""Fixtures for the end-to-end tests; the helpers they use (``LabelStudioServer``, ``running_backend``, ...) are
plain functions and classes in ``tests/e2e/label_studio.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .label_studio import LabelStudioServer, require_label_studio


@pytest.fixture(scope="session")
def label_studio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One real Label Studio for the whole session (the first start runs ~45 s of migrations); skips when it is
    not installed, unless MEDEBIASER_E2E=1."""
    require_label_studio()
    with LabelStudioServer(tmp_path_factory.mktemp("label-studio")) as server:
        yield server
