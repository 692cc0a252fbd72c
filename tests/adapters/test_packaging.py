"""The adapter distribution installs on its own and stays off the serving stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PROJECT = REPO_ROOT / "downstream_adapters"
FORBIDDEN_IMPORTS = {"encoder_service", "fastapi", "redis", "onnxruntime", "uvicorn"}
FORBIDDEN_CORE = {"fastapi", "redis", "onnxruntime", "torch", "uvicorn", "encoder-service"}


def test_no_module_imports_the_service_or_its_stack() -> None:
    for path in (PROJECT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path.name} imports {name}"


@pytest.mark.slow
def test_wheel_installs_alone_into_a_fresh_venv(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    subprocess.run([*build, str(PROJECT)], check=True, timeout=300)
    (wheel,) = wheels.glob("downstream_adapters-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    probe = (
        "import importlib.metadata as m, json; d = m.distribution('downstream-adapters'); "
        "print(json.dumps({'requires': d.requires, 'scripts': "
        "[e.name for e in d.entry_points]}))"
    )
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True)
    meta = json.loads(out.stdout)
    core = [r for r in meta["requires"] if "extra ==" not in r]
    core_names = {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in core}
    assert core_names == {"numpy", "httpx", "tenacity"}
    assert not core_names & FORBIDDEN_CORE
    extras = " ".join(r for r in meta["requires"] if "extra ==" in r)
    assert 'torch>=2.2; extra == "torch"' in extras
    assert "adapters-evaluate" in meta["scripts"]
