"""The deployment files, checked without a Docker engine or a cluster: every command they run is
a real command of this CLI with real options, every setting they pass is a field of Settings,
and the serving image installs no torch."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from encoder_service.cli import app
from encoder_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
K8S = [
    doc
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]
runner = CliRunner()


def _setting_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"ENCODER_{name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []) or ([alias] if isinstance(alias, str) else []))
    return names


SETTINGS = _setting_names()


def _check_command(command: list[str]) -> None:
    """``encoder-service <sub> [--option value]…``: the subcommand exists (walked through the
    command groups typer builds), ``--help`` runs, and every option given appears in its help."""
    assert command[0] == "encoder-service", command
    node = typer.main.get_command(app)
    path: list[str] = []
    for word in command[1:]:
        if word not in getattr(node, "commands", {}):
            break
        node, path = node.commands[word], [*path, word]
    assert path and not hasattr(node, "commands"), f"{command}: not an encoder-service command"
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in (w.split("=")[0] for w in command[1:] if w.startswith("--")):
        assert option in result.output, f"{command}: {option} is not an option of {path}"


def _compose_commands() -> list[tuple[str, list[str]]]:
    return [
        (name, service["command"])
        for name, service in COMPOSE["services"].items()
        if service.get("command", [""])[0] == "encoder-service"
    ]


@pytest.mark.parametrize("name", [n for n, _ in _compose_commands()])
def test_compose_commands_are_real_cli_commands(name: str) -> None:
    _check_command(COMPOSE["services"][name]["command"])


def test_compose_runs_the_whole_stack_in_order() -> None:
    services = COMPOSE["services"]
    assert {"redis", "trainer", "api", "refresher"} <= services.keys()
    assert services["redis"]["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert services["refresher"]["command"][:2] == ["encoder-service", "refresh"]
    for name in ("api", "refresher"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["trainer"]["condition"] == "service_completed_successfully"
    assert services["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert re.fullmatch(
        r"\$\{ENCODER_API_KEYS:\?.+\}", services["api"]["environment"]["ENCODER_API_KEYS"]
    )


def test_compose_and_k8s_settings_are_fields_of_settings() -> None:
    passed = [
        (name, key)
        for name, service in COMPOSE["services"].items()
        if "encoder-service" in str(service.get("build", {})) or name in ("api", "refresher")
        for key in service.get("environment", {})
    ]
    as_environment = {
        ref["name"]
        for doc in K8S
        if doc["kind"] in ("Deployment", "Job")
        for container in _pod(doc)["containers"]
        for source in container.get("envFrom", [])
        for ref in (source.get("configMapRef"), source.get("secretRef"))
        if ref
    }
    passed += [
        ("ConfigMap/Secret", key)
        for doc in K8S
        if doc["kind"] in ("ConfigMap", "Secret") and doc["metadata"]["name"] in as_environment
        for key in {**doc.get("data", {}), **doc.get("stringData", {})}
    ]
    unknown = [(where, key) for where, key in passed if key not in SETTINGS]
    assert passed and unknown == []


def test_k8s_api_reads_its_keys_from_a_mounted_secret_file() -> None:
    """A whole-directory Secret mount is what lets keys rotate without restarting a pod."""
    (doc,) = [
        d for d in K8S if d["kind"] == "Deployment" and d["metadata"]["name"] == "encoder-api"
    ]
    (container,) = _pod(doc)["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    path = Path(env["ENCODER_API_KEYS_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert "subPath" not in mount
    (volume,) = [v for v in _pod(doc)["volumes"] if v["name"] == mount["name"]]
    (secret,) = [
        d
        for d in K8S
        if d["kind"] == "Secret" and d["metadata"]["name"] == volume["secret"]["secretName"]
    ]
    assert path.name in secret["stringData"]
    assert "ENCODER_API_KEYS_FILE" in SETTINGS


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def _containers(kind: str, name: str) -> list[dict[str, Any]]:
    (doc,) = [d for d in K8S if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc["spec"]["template"]["spec"]["containers"]


def test_k8s_workloads_run_real_commands_with_probes_and_scrape_annotations() -> None:
    (api,) = _containers("Deployment", "encoder-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (refresher,) = _containers("Deployment", "encoder-refresher")
    (train,) = _containers("Job", "encoder-train")
    for container in (api, refresher, train):
        _check_command(container["command"])
        assert {"configMapRef": {"name": "encoder-config"}} in container["envFrom"]
        assert {"secretRef": {"name": "encoder-secrets"}} in container["envFrom"]
    for doc in K8S:
        if doc["kind"] == "Deployment":
            annotations = doc["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"


def test_the_refresher_scales_on_consumer_group_lag() -> None:
    (hpa,) = [
        d
        for d in K8S
        if d["kind"] == "HorizontalPodAutoscaler"
        and d["spec"]["scaleTargetRef"]["name"] == "encoder-refresher"
    ]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "encoder_refresh_group_lag_entries"
    from encoder_service.refresher import metrics

    assert metrics.GROUP_LAG._name == "encoder_refresh_group_lag_entries"


def _stage(dockerfile: str, name: str) -> str:
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S)
    assert match, f"no {name} stage"
    return match.group(1)


def test_the_serving_image_installs_no_torch() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    serve = _stage(dockerfile, "serve")
    installs = re.findall(r"pip install (.+)", serve)
    assert installs == ["."], "the serve stage must install the base dependencies only"
    assert "torch" not in serve.lower()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = [re.split(r"[<>=\[; ]", dep)[0].lower() for dep in project["dependencies"]]
    assert not {"torch", "onnx", "onnxscript", "pandas"} & set(base), base
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["train"])
    assert "torch" in _stage(dockerfile, "train")
