"""Fixtures every test gets."""

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_gptforge_logger():
    """`gptforge.cli.main` points the "gptforge" logger at stderr (as a command should); put it back after
    each test, so that a test calling the CLI never makes a later test's library code print."""
    logger = logging.getLogger("gptforge")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
