"""The CI dependency audit's verdict on pip-audit reports: fixable findings fail, findings with
no fix and an unreachable database are reported without failing."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.conftest import REPO_ROOT


def load_audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dependency_audit", REPO_ROOT / ".ci" / "dependency_audit.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dep(name: str, *vulns: tuple[str, list[str]]) -> dict:
    return {
        "name": name,
        "version": "1.0",
        "vulns": [{"id": i, "fix_versions": f, "aliases": [], "description": ""} for i, f in vulns],
    }


def test_a_finding_with_a_fixed_release_fails() -> None:
    report = {"dependencies": [dep("jinja2", ("PYSEC-2021-66", ["2.11.3"])), dep("numpy")]}
    lines, code = load_audit().summarize(report)
    assert code == 1
    assert any("jinja2" in line and "2.11.3" in line for line in lines)
    assert lines[-1] == "audit: 2 packages audited, 1 known vulnerabilities, 1 with a fixed release"


def test_a_finding_without_a_fix_is_reported_but_passes() -> None:
    skipped = {
        "name": "local-pkg",
        "skip_reason": "Dependency not found on PyPI and could not be audited",
    }
    report = {"dependencies": [dep("torch", ("GHSA-xxxx", [])), skipped]}
    lines, code = load_audit().summarize(report)
    assert code == 0
    assert any("torch" in line and "no fix yet" in line for line in lines)
    assert any("could not be looked up: local-pkg" in line for line in lines)


def test_an_unreachable_database_is_reported_and_passes() -> None:
    reason = "Dependency not found on PyPI and could not be audited: numpy (2.0)"
    report = {"dependencies": [{"name": n, "skip_reason": reason} for n in ("numpy", "redis")]}
    (line,), code = load_audit().summarize(report)
    assert code == 0 and line.startswith("audit: SKIPPED, none of 2 packages")
