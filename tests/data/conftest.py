"""Fixtures of the data tests: the real data sets (skipped only when absent) and small files."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest


def _real_folder(shared_data_dir: Path, name: str, marker_file: str) -> Path:
    folder = shared_data_dir / name
    if not (folder / marker_file).is_file():
        pytest.skip(f"{name} not found under {shared_data_dir}; set ENCODER_DATA_DIR")
    return folder


@pytest.fixture(scope="session")
def movielens_100k_dir(shared_data_dir: Path) -> Path:
    return _real_folder(shared_data_dir, "movielens-100k", "u.data")


@pytest.fixture(scope="session")
def ciao_dir(shared_data_dir: Path) -> Path:
    return _real_folder(shared_data_dir, "ciao", "ratings_with_timestamp.csv.gz")


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a small text file (indentation removed) into the test's folder."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
