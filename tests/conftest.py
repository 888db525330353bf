"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _remove_temp_folders() -> Iterator[None]:
    """The /tmp folders of nodes, Orthancs and storage the tests made go at the end of the session."""
    yield
    import os

    from tests.peers import remove_short_tmps

    if os.environ.get("AINODE_KEEP_TMP") != "1":
        remove_short_tmps()


@pytest.fixture(scope="session")
def lung1_image_path() -> Path:
    """The cached real-CT sample (fetched once with pip into $AINODE_CACHE or ~/.cache/ainode)."""
    from node.sample import fetch_lung1

    return fetch_lung1()


@pytest.fixture(scope="session")
def lung1(lung1_image_path: Path) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """(int16 HU volume (z, y, x), spacing (z, y, x) mm, origin (x, y, z), direction) of lung1."""
    from node.sample import read_nrrd_volume

    return read_nrrd_volume(lung1_image_path)


@pytest.fixture(scope="session")
def lung1_series(tmp_path_factory: pytest.TempPathFactory, lung1_image_path: Path) -> list[Path]:
    """The real lung1 chest CT as a 48-slice DICOM CT series (made-up patient and UIDs)."""
    from node.sample import make_lung1_series

    return make_lung1_series(tmp_path_factory.mktemp("lung1"), cache_dir=lung1_image_path.parent)


@pytest.fixture
def nodes() -> Iterator[list]:
    """Collects the NodeProcess objects a test starts; stops them, and their embedded Redis, after it."""
    from tests.peers import kill_pid

    started: list = []
    yield started
    for node in started:
        pid = node.embedded_redis_pid()
        node.stop()
        if pid is not None:  # after a kill -9 the embedded Redis may still run
            kill_pid(pid)


@pytest.fixture(scope="session")
def redis_server():
    """A throw-away redis-server on a free port (not the machine's 6379); flush it before use."""
    from tests.peers import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def test_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real ONNX model (node.testmodel) with a card and a score map: fast analyses."""
    from node.testmodel import build_test_model

    path = tmp_path_factory.mktemp("model") / "test-cnn.onnx"
    build_test_model(path, size=64, context=1)
    return path


@pytest.fixture
def pacs() -> Iterator:
    """A throw-away Orthanc as the PACS (DICOM and HTTP on free 127.0.0.1 ports)."""
    from tests.peers import Orthanc, short_tmp

    orthanc = Orthanc(short_tmp("orthanc-")).start()
    yield orthanc
    orthanc.stop()
