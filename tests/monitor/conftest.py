"""Fixtures of the monitor tests (helpers in monitor_utils)."""

from pathlib import Path

import pytest

from tests.monitor.monitor_utils import save_classifier


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("monitor") / "clf")


@pytest.fixture(scope="session")
def negative_classifier(tmp_path_factory) -> Path:
    return save_classifier(tmp_path_factory.mktemp("monitor") / "clf-negative", favour="negative")


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory) -> Path:
    from tests.cli_utils import save_tiny_bpe_checkpoint

    return save_tiny_bpe_checkpoint(tmp_path_factory.mktemp("monitor") / "lm")

