"""The Helm chart: rendered offline (helm-python-sdk, Helm's own library), every manifest validated
against the Kubernetes schemas (kubernetes-validate, strict), linted (helm lint, yamllint), and the
objects an operator relies on checked for both the default and a production-like values set."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.platform import metrics as m
from tests.deploy._support import DEPLOY, INSTALL_HINT, ROOT

CHART = ROOT / "helm" / "lorafleet"
PRODUCTION = DEPLOY / "examples" / "values-production.yaml"
YAMLLINT = DEPLOY / "yamllint.yaml"
KUBE_VERSIONS = ("1.29.0", "1.37.0")
ROLES = ("api", "trainer", "serving", "rollout-controller")
# the `lorafleet` subcommand each container runs (services/cli/main.py)
ROLE_COMMANDS = {"api": "api", "trainer": "trainer", "serving": "serve",
                 "rollout-controller": "rollout-controller", "migrate": "migrate"}
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
"""Prometheus Operator CRDs: kubernetes-validate has no schema for them; checked by hand below."""


def _helm() -> Any:
    try:
        import helm_python
    except ImportError:
        pytest.fail(f"helm-python-sdk is not installed: {INSTALL_HINT}")
    return helm_python


def _production_values() -> dict[str, Any]:
    return dict(yaml.safe_load(PRODUCTION.read_text()))


def render_files(values: dict[str, Any] | None) -> dict[str, str]:
    """Template path to rendered text, as `helm template prod -n lorafleet` renders them (hooks included)."""
    helm = _helm()
    with helm.Chart.load(str(CHART)) as chart:
        out: dict[str, str] = chart.render(values, name="prod", namespace="lorafleet", is_install=True)
    return {k: v for k, v in out.items() if k.endswith(".yaml") and v.strip()}


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [doc for text in render_files(values).values() for doc in yaml.safe_load_all(text) if doc]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _container(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    deployment = _one(docs, "Deployment", f"prod-lorafleet-{role}")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture(params=["default", "production"], scope="module")
def values(request: pytest.FixtureRequest) -> dict[str, Any] | None:
    return _production_values() if request.param == "production" else None


# -- validity --------------------------------------------------------------------------------------
def test_chart_lints_clean(values: dict[str, Any] | None) -> None:
    report = _helm().lint(str(CHART), values, strict=True)
    serious = [msg for msg in report["messages"] if msg["severity"] >= 2]
    assert report["errors"] == [] and serious == []


def test_lint_catches_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "lorafleet"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "api.yaml").write_text(
        (broken / "templates" / "api.yaml").read_text() + "\n{{ .Values.missing.deeper }}\n")
    report = _helm().lint(str(broken), None, strict=True)
    assert any(msg["severity"] == 3 and "api.yaml" in msg["error"] for msg in report["messages"])


def test_every_manifest_validates_against_the_kubernetes_schemas(values: dict[str, Any] | None) -> None:
    try:
        from kubernetes_validate import utils as kv
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed: {INSTALL_HINT}")
    docs = render(values)
    checked = 0
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)  # strict: unknown fields are errors too
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {exc}")
        checked += 1
    assert checked >= 13


def test_validation_catches_a_wrong_field() -> None:
    from kubernetes_validate import utils as kv

    deployment = _one(render(None), "Deployment", "prod-lorafleet-api")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/healthz"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_rendered_manifests_and_values_pass_yamllint(values: dict[str, Any] | None) -> None:
    try:
        from yamllint import linter
        from yamllint.config import YamlLintConfig
    except ImportError:
        pytest.fail(f"yamllint is not installed: {INSTALL_HINT}")
    config = YamlLintConfig(file=str(YAMLLINT))
    sources = {f"rendered {k}": v for k, v in render_files(values).items()}
    files = [CHART / "Chart.yaml", CHART / "values.yaml", PRODUCTION,
             *sorted((DEPLOY / "prometheus").rglob("*.yml"))]
    for path in files:
        sources[str(path.relative_to(ROOT))] = path.read_text()
    problems = [f"{name}:{p.line}: {p.desc}" for name, text in sources.items()
                for p in linter.run(text, config) if p.level == "error"]
    assert problems == []


# -- what the chart deploys ----------------------------------------------------------------------
def test_each_role_is_a_deployment_running_its_cli_command(values: dict[str, Any] | None) -> None:
    docs = render(values)
    for role in ROLES:
        container = _container(docs, role)
        assert container["command"] == ["lorafleet"]
        assert container["args"][0] == ROLE_COMMANDS[role]
        assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        env_from = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
        assert env_from["configMapRef"] == "prod-lorafleet"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Service", f"prod-lorafleet-{r}") for r in ROLES} <= kinds
    assert ("ConfigMap", "prod-lorafleet") in kinds


@pytest.mark.parametrize("command", sorted(set(ROLE_COMMANDS.values())))
def test_chart_commands_exist_in_the_cli(command: str) -> None:
    from lorafleet.services.cli.main import app

    registered = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}  # type: ignore[union-attr]
    assert command in registered, f"the chart runs `lorafleet {command}`, which the CLI does not have"


def test_rollout_controller_is_a_single_active_instance(values: dict[str, Any] | None) -> None:
    deployment = _one(render(values), "Deployment", "prod-lorafleet-rollout-controller")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_migration_runs_as_a_pre_install_and_pre_upgrade_hook(values: dict[str, Any] | None) -> None:
    docs = render(values)
    job = _one(docs, "Job", "prod-lorafleet-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert (container["command"], container["args"]) == (["lorafleet"], ["migrate"])
    secret_ref = _env(container)["LORAFLEET_DATABASE_URL"]["secretKeyRef"]
    # the hook runs before the release's own objects exist: its Secret must be a hook too, or external
    referenced = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_ref["name"]]
    if values is None:
        [secret] = referenced
        assert secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
            job["metadata"]["annotations"]["helm.sh/hook-weight"])
    else:
        assert referenced == [] and secret_ref["name"] == "lorafleet-credentials"


def test_pod_disruption_budgets_cover_the_replicated_roles(values: dict[str, Any] | None) -> None:
    docs = render(values)
    pdbs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"prod-lorafleet-api", "prod-lorafleet-trainer", "prod-lorafleet-serving"}
    for name, pdb in pdbs.items():
        deployment = _one(docs, "Deployment", name)
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_trainer_gets_gpus_node_selector_and_tolerations() -> None:
    default = _container(render(None), "trainer")
    assert default["resources"]["limits"]["nvidia.com/gpu"] == 1
    prod_docs = render(_production_values())
    spec = _one(prod_docs, "Deployment", "prod-lorafleet-trainer")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = _container(render({"trainer": {"gpu": {"enabled": False}}}), "trainer")
    assert "nvidia.com/gpu" not in cpu_only["resources"].get("limits", {})
    mig = _container(render({"trainer": {"gpu": {"count": 2, "resourceName": "nvidia.com/mig-3g.40gb"}}}),
                     "trainer")
    assert mig["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == 2
    assert "nvidia.com/gpu" not in mig["resources"]["limits"]


def test_trainer_device_follows_its_gpu_unless_set() -> None:
    from lorafleet.platform.config import Settings

    def device(values: dict[str, Any] | None) -> str:
        return str(_env(_container(render(values), "trainer"))["LORAFLEET_TRAINER_DEVICE"])

    assert device(None) == "cuda"
    assert device(_production_values()) == "cuda"
    assert device({"trainer": {"gpu": {"enabled": False}}}) == "cpu"
    assert device({"trainer": {"device": "cuda:1"}}) == "cuda:1"
    for value in ("cuda", "cpu", "cuda:1"):  # what the chart writes is what the trainer accepts
        assert Settings(trainer_device=value).trainer_device == value


def test_serving_engine_vllm_yields_the_vllm_container() -> None:
    torch_docs = render(None)
    torch_c = _container(torch_docs, "serving")
    assert torch_c["image"] == "lorafleet:0.1.0"
    assert _env(torch_c)["LORAFLEET_SERVING_ENGINE"] == "torch"
    assert "nvidia.com/gpu" not in torch_c["resources"].get("limits", {})

    vllm_docs = render({"serving": {"engine": "vllm"}})
    vllm_c = _container(vllm_docs, "serving")
    assert (vllm_c["command"], vllm_c["args"]) == (["lorafleet"], ["serve"])
    assert vllm_c["image"] == "lorafleet-vllm:0.1.0"
    env = _env(vllm_c)
    assert env["LORAFLEET_SERVING_ENGINE"] == "vllm"
    assert env["LORAFLEET_SERVING_DTYPE"] == "bfloat16"
    assert env["LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION"] == "0.9"
    assert "LORAFLEET_SERVING_DEVICE" not in env
    assert vllm_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "shm", "mountPath": "/dev/shm"} in vllm_c["volumeMounts"]
    pod = _one(vllm_docs, "Deployment", "prod-lorafleet-serving")["spec"]["template"]["spec"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]


def test_unknown_serving_engine_is_refused() -> None:
    helm = _helm()
    with pytest.raises(helm.HelmRenderError, match="serving.engine must be torch or vllm"):
        render({"serving": {"engine": "tgi"}})


def test_serving_autoscaling_on_cpu_or_queue_depth() -> None:
    assert not [d for d in render(None) if d["kind"] == "HorizontalPodAutoscaler"]
    cpu = _one(render({"serving": {"autoscaling": {"enabled": True}}}), "HorizontalPodAutoscaler",
               "prod-lorafleet-serving")
    assert cpu["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    docs = render(_production_values())
    hpa = _one(docs, "HorizontalPodAutoscaler", "prod-lorafleet-serving")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    # the metric the HPA scales on is one serving replicas really export, as a per-pod gauge
    families = {f.name: f.type for f in m.REGISTRY.collect()}
    assert families[metric["pods"]["metric"]["name"]] == "gauge"
    # the HPA owns the replica count
    assert "replicas" not in _one(docs, "Deployment", "prod-lorafleet-serving")["spec"]


def test_external_services_only_no_database_in_the_chart(values: dict[str, Any] | None) -> None:
    docs = render(values)
    assert not [d for d in docs if d["kind"] in {"StatefulSet", "PersistentVolumeClaim"}]
    images = {c["image"] for d in docs if d["kind"] in {"Deployment", "Job"}
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert all("lorafleet" in i for i in images), images
    config = _one(docs, "ConfigMap", "prod-lorafleet")["data"]
    assert config["LORAFLEET_OBJECT_STORE"] == "s3" and config["LORAFLEET_QUEUE_BACKEND"] == "redis"
    assert all(k.startswith("LORAFLEET_") for k in config)
    assert not {"LORAFLEET_DATABASE_URL", "LORAFLEET_S3_SECRET_KEY", "LORAFLEET_REDIS_URL"} & set(config)


def test_credentials_go_to_the_secret() -> None:
    docs = render({"database": {"url": "postgresql://lf:pw@pg:5432/lf"}, "redis": {"url": "redis://:pw@redis:6379/0"},
                   "objectStore": {"s3": {"accessKey": "AKIA1", "secretKey": "s3cret"}}})
    secret = _one(docs, "Secret", "prod-lorafleet")["stringData"]
    assert secret == {"LORAFLEET_DATABASE_URL": "postgresql://lf:pw@pg:5432/lf",
                      "LORAFLEET_REDIS_URL": "redis://:pw@redis:6379/0",
                      "LORAFLEET_S3_ACCESS_KEY": "AKIA1", "LORAFLEET_S3_SECRET_KEY": "s3cret"}
    def secret_checksum(docs: list[dict[str, Any]]) -> str:
        pod = _one(docs, "Deployment", "prod-lorafleet-api")["spec"]["template"]
        return str(pod["metadata"]["annotations"]["checksum/secret"])

    assert secret_checksum(docs) != secret_checksum(render(None))  # pods roll when credentials change


def test_prometheus_operator_resources() -> None:
    docs = render(_production_values())
    monitor = _one(docs, "ServiceMonitor", "prod-lorafleet")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [d for d in docs if d["kind"] == "Service"
                and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()]
    assert {d["metadata"]["name"] for d in selected} == {f"prod-lorafleet-{r}" for r in ROLES}
    port = monitor["spec"]["endpoints"][0]["port"]
    assert all(port in {p["name"] for p in d["spec"]["ports"]} for d in selected)
    # job="lorafleet", as the alert rules expect
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    rule = _one(docs, "PrometheusRule", "prod-lorafleet")
    rules_file = DEPLOY / "prometheus" / "rules" / "lorafleet.rules.yml"
    assert rule["spec"] == yaml.safe_load(rules_file.read_text())


def test_chart_rules_copy_is_the_deploy_rules_file() -> None:
    assert (CHART / "files" / "lorafleet.rules.yml").read_text() == \
        (DEPLOY / "prometheus" / "rules" / "lorafleet.rules.yml").read_text()


# read from the environment by services/api/routes/ui.py until Settings grows the field
PENDING_SETTINGS = {"prometheus_url"}


def test_every_lorafleet_variable_the_chart_sets_is_a_real_setting(values: dict[str, Any] | None) -> None:
    from lorafleet.platform.config import Settings
    from lorafleet.services.serving.replica import ServingOptions

    known = set(Settings.model_fields) | set(ServingOptions.model_fields) | PENDING_SETTINGS
    docs = render(values | {"database": {"url": "postgresql://x"}} if values else {"database": {"url": "postgresql://x"}})
    names = set(_one(docs, "ConfigMap", "prod-lorafleet")["data"])
    names |= {k for d in docs if d["kind"] == "Secret" for k in d.get("stringData") or {}}
    names |= {e["name"] for d in docs if d["kind"] in {"Deployment", "Job"}
              for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    settings = {n.removeprefix("LORAFLEET_").lower() for n in names if n.startswith("LORAFLEET_")}
    assert settings - known == set()
    assert {"database_url", "serving_engine", "max_device_adapters", "max_cache_bytes"} <= settings
