"""deploy/: the compose file for one GPU server and the Helm values for the Dagster chart.

Their own tools validate them where installed (`docker compose config` or Debian's `docker-compose config`;
`helm template` with the Dagster chart); without the tool the test is skipped with the reason. The other checks run
everywhere: the compose file against the Compose specification's JSON schema (vendored by check-jsonschema), the
containers' Dagster instance file against Dagster's own config schema, and the services, commands and node selection
against the project's real entry points.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from assets.workspace import PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"
VALUES = DEPLOY / "helm" / "values.yaml"
BIN = Path(sys.executable).parent
DAGSTER_CHART_VERSION = "1.13.27"  # the chart is versioned with dagster; deploy/helm/values.yaml names this one


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def _compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


# ---- with the real tools, where installed ---------------------------------------------------------------------------
def test_compose_file_validates_with_docker_compose(tmp_path):
    tool = _compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` (the plugin) nor `docker-compose` is installed: "
                    "apt-get install docker-compose (or the docker-compose-plugin) to run this check")
    result = _run([*tool, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) >= {"postgres", "mlflow", "dagster-code", "dagster-webserver", "dagster-daemon",
                                         "studio"}
    # The build context resolves to the project root, where deploy/Dockerfile copies the project from.
    context = Path(rendered["services"]["dagster-code"]["build"]["context"])
    assert context.resolve() == PROJECT_ROOT.resolve()
    # Without the passwords the file refuses to start (no default password reaches a database).
    empty = tmp_path / "empty.env"  # not deploy/.env, which a developer may have
    empty.write_text("")
    bare = _run([*tool, "-f", str(COMPOSE), "--env-file", str(empty), "config"], cwd=tmp_path,
                env={k: v for k, v in os.environ.items() if not k.startswith("SVC_")})
    assert bare.returncode != 0 and "SVC_POSTGRES_PASSWORD" in bare.stderr + bare.stdout


def _dagster_chart() -> str | None:
    """A local copy of the Dagster chart: $SVC_DAGSTER_CHART (a folder or .tgz), else `helm pull` (needs the
    chart repository to be reachable)."""
    chart = os.environ.get("SVC_DAGSTER_CHART")
    if chart and Path(chart).exists():
        return chart
    return None


def test_helm_values_render_with_the_dagster_chart(tmp_path):
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not installed (no Debian or PyPI package of it here): install helm 3 and set "
                    "SVC_DAGSTER_CHART to the dagster chart (`helm pull dagster/dagster --version "
                    f"{DAGSTER_CHART_VERSION}`) to run this check")
    chart = _dagster_chart()
    if chart is None:
        pulled = _run([helm, "pull", "dagster", "--repo", "https://dagster-io.github.io/helm", "--version",
                       DAGSTER_CHART_VERSION, "-d", str(tmp_path)])
        if pulled.returncode != 0:
            pytest.skip(f"the dagster chart is not available offline (set SVC_DAGSTER_CHART): {pulled.stderr.strip()}")
        chart = str(next(tmp_path.glob("dagster-*.tgz")))
    # The chart's values.schema.json validates the values; rendering proves the templates accept them.
    lint = _run([helm, "lint", chart, "-f", str(VALUES)])
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = _run([helm, "template", "svc", chart, "-f", str(VALUES), "-n", "svc"])
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    instance = next(d for d in docs if d["kind"] == "ConfigMap" and "dagster.yaml" in d.get("data", {}))
    dagster_yaml = yaml.safe_load(instance["data"]["dagster.yaml"])
    assert dagster_yaml["run_launcher"]["class"] == "K8sRunLauncher"
    pod_spec = dagster_yaml["run_launcher"]["config"]["run_k8s_config"]["pod_spec_config"]
    assert pod_spec["node_selector"] == {"voicecraft.dev/node-pool": "cpu"}
    code = next(d for d in docs if d["kind"] == "Deployment" and "svc" in d["metadata"]["name"]
                and "user-deployments" in d["metadata"]["name"])
    container = code["spec"]["template"]["spec"]["containers"][0]
    assert "orchestration.definitions" in container["args"]


# ---- everywhere ----------------------------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification():
    # Bug caught: a key the Compose specification does not have (a typo, a v1-only field) in compose.yaml.
    result = _run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_run_the_projects_real_entry_points():
    compose = _compose()
    services = compose["services"]
    # The services: Postgres, the Dagster webserver, daemon and code location, the MLflow server, the studio.
    assert {"postgres", "dagster-webserver", "dagster-daemon", "dagster-code", "mlflow", "studio"} <= set(services)
    command = {name: s.get("command") or [] for name, s in services.items()}
    assert command["dagster-code"][:3] == ["dagster", "code-server", "start"]
    assert command["dagster-code"][command["dagster-code"].index("-m") + 1] == "orchestration.definitions"
    assert command["dagster-webserver"][0] == "dagster-webserver"
    assert command["dagster-daemon"][:2] == ["dagster-daemon", "run"]
    assert command["studio"][:2] == ["svc", "studio"] and "--host" in command["studio"]
    assert command["mlflow"][:2] == ["mlflow", "server"] and "--serve-artifacts" in command["mlflow"]
    backend = command["mlflow"][command["mlflow"].index("--backend-store-uri") + 1]
    # Bug caught: `postgresql://` alone, which SQLAlchemy 2.1 reads as psycopg 3 (not installed); or a password
    # written into the file instead of PGPASSWORD.
    assert backend.startswith("postgresql+psycopg2://") and ":" not in backend.split("//")[1].split("@")[0]
    assert command["init"][:2] == ["svc", "init"] and "--postgres" in command["init"] and "--mlflow" in command["init"]
    # Every executable exists in this environment (the image installs the same project) and takes the flags used.
    help_of = {"dagster-code": ["dagster", "code-server", "start"], "dagster-webserver": ["dagster-webserver"],
               "dagster-daemon": ["dagster-daemon", "run"], "studio": ["svc", "studio"], "mlflow": ["mlflow", "server"],
               "init": ["svc", "init"]}
    for name, prefix in help_of.items():
        assert command[name][:len(prefix)] == prefix
        exe = BIN / prefix[0]
        assert exe.is_file(), f"{name}: {prefix[0]} is not installed by the project"
        help_text = _run([str(exe), *prefix[1:], "--help"]).stdout
        for flag in (a for a in command[name] if a.startswith("-")):
            assert f"{flag} " in help_text or f"{flag}," in help_text or f"{flag}\n" in help_text, \
                f"{name}: `{' '.join(prefix)}` has no {flag}"
    # The GPU goes to the containers that train: the code location (runs start there) and the studio.
    for name in ("dagster-code", "studio"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "deploy" not in services["dagster-webserver"] and "deploy" not in services["postgres"]
    # The webserver and daemon load the code location the compose file runs.
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] == "dagster-code" and str(server["port"]) == command["dagster-code"][
        command["dagster-code"].index("-p") + 1]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY deploy/dagster.yaml deploy/workspace.yaml /opt/dagster/home/" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile  # editable: PROJECT_ROOT keeps configs/ beside the code


def test_container_instance_file_passes_dagsters_config_schema(monkeypatch):
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.instance.ref import InstanceRef

    monkeypatch.setenv("PGPASSWORD", "x")
    # Bug caught: a key Dagster does not know, or a storage class that is not installed (dagster-postgres).
    config, _ = dagster_instance_config(str(DEPLOY))
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "PGPASSWORD"}
    ref = InstanceRef.from_dir(str(DEPLOY))
    assert ref.run_launcher_data.class_name == "DefaultRunLauncher"
    assert ref.storage_data.module_name == "dagster_postgres"


def test_helm_values_launch_on_kubernetes_with_train_on_gpu_nodes():
    from orchestration.jobs import NODE_POOL_LABEL, TRAIN_K8S_CONFIG, build_singer_job, train_job

    values = _values()
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    k8s = launcher["config"]["k8sRunLauncher"]
    # Every run defaults to the CPU pool (feature builds, one run per singer partition) ...
    default_selector = k8s["runK8sConfig"]["podSpecConfig"]["node_selector"]
    assert default_selector == {NODE_POOL_LABEL: "cpu"}
    # ... and the train job's tag moves its runs to the GPU pool. Bug caught: a different label key (the selectors
    # would add up and match no node) or camelCase on one side only (both keys would reach the pod spec).
    tag = train_job.run_tags["dagster-k8s/config"]  # Dagster stores a tag value as JSON
    assert json.loads(tag) == TRAIN_K8S_CONFIG
    assert set(TRAIN_K8S_CONFIG["pod_spec_config"]["node_selector"]) == set(default_selector)
    assert TRAIN_K8S_CONFIG["pod_spec_config"]["node_selector"][NODE_POOL_LABEL] == "gpu"
    assert TRAIN_K8S_CONFIG["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in TRAIN_K8S_CONFIG["pod_spec_config"]["tolerations"])
    assert "dagster-k8s/config" not in (build_singer_job.run_tags or {})  # builds stay on the CPU default
    # The code location runs the project's definitions from its image, and its env reaches the launched runs.
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "orchestration.definitions"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SVC_WORKSPACE"] == "/srv/workspace"
    assert env["SVC_DAGSTER_POSTGRES_URL"].startswith("postgresql://")
    assert env["SVC_MLFLOW_TRACKING_URI"].startswith("http")
    assert "@" in env["SVC_DAGSTER_POSTGRES_URL"] and ":" not in env["SVC_DAGSTER_POSTGRES_URL"].split("//")[1].split(
        "@")[0], "no password in the values: PGPASSWORD comes from a secret"
    # The workspace volume is mounted both in the code location and in every run pod.
    for holder in (deployment, k8s):
        assert {m["mountPath"] for m in holder["volumeMounts"]} == {"/srv/workspace"}
    assert values["postgresql"]["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    # The module the chart's gRPC server loads exists and defines the train job with that tag.
    from orchestration import definitions

    job = definitions.defs.resolve_job_def("train")
    assert json.loads(job.run_tags["dagster-k8s/config"]) == TRAIN_K8S_CONFIG

