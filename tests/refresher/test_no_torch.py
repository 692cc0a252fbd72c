"""The refresher and the API run in slim images: importing them must not pull the training stack."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.refresher.conftest import repo_root

SERVING_MODULES = [
    "encoder_service.events",
    "encoder_service.refresher.cli",
    "encoder_service.refresher.commit",
    "encoder_service.refresher.consumer",
    "encoder_service.refresher.deadletter",
    "encoder_service.refresher.health",
    "encoder_service.refresher.metrics",
    "encoder_service.refresher.models",
    "encoder_service.api.app",
    "encoder_service.api.routes.events",
]
FORBIDDEN = ("torch", "pandas", "encoder_service.training")


def test_refresher_and_api_modules_import_without_torch_pandas_or_training() -> None:
    script = (
        "import importlib, json, sys\n"
        f"for name in {SERVING_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo_root(), capture_output=True, text=True, check=True
    )
    loaded = json.loads(done.stdout)
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert leaked == []
    assert set(SERVING_MODULES) <= set(loaded)
