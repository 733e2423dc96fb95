"""The Kubernetes deployment, validated offline: every overlay renders, every object validates against its schema
(core kinds with kubernetes-validate, KubeRay kinds against the vendored CRDs with unknown fields rejected), and
the manifests agree with the code: Ray version, entrypoints, the serve builder and its args, Secrets, resources,
and the install recipe the images share with the README."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.infra.kustomize import canonical, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
CRDS = REPO / "infra" / "schemas" / "kuberay"
OVERLAYS = ["dev", "gpu"]
KUBERNETES_VERSION = "1.33.0"  # a Kubernetes version KubeRay v1.7 supports; the schemas ship in kubernetes-validate
CONTAINER_LISTS = ("containers", "initContainers")


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize` when available (what users run), else the repository's small renderer."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
        return tuple(o for o in yaml.safe_load_all(out) if o)
    return tuple(render(K8S / "overlays" / overlay))


def objects(overlay: str, group: str | None = None) -> list[dict]:
    objs = [copy.deepcopy(o) for o in rendered(overlay)]
    return [o for o in objs if group is None or o["apiVersion"].split("/")[0] == group]


def walk(node, path=()):
    """Every (path, dict) in a document."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def containers(obj: dict) -> list[tuple[tuple, dict]]:
    return [((*path, key, i), c) for path, node in walk(obj) for key in CONTAINER_LISTS
            if isinstance(node.get(key), list) and path and path[-1] == "spec"
            for i, c in enumerate(node[key])]


# ---------------------------------------------------------------------------------------------------- schemas


def closed(schema: dict) -> dict:
    """The CRD's schema with unknown fields rejected, as the API server does for structural schemas."""
    schema = copy.deepcopy(schema)
    for _, node in walk(schema):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml is 10x faster
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)  # safe loader
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = closed(v1["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's, not the CRD's
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(obj["kind"]).iter_errors(obj)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_validate_against_kubernetes(overlay):
    core = [o for o in objects(overlay) if o["apiVersion"].split("/")[0] not in ("ray.io", "monitoring.coreos.com")]
    assert {o["kind"] for o in core} >= {"Deployment", "StatefulSet", "Service", "Job"}
    for obj in core:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_objects_validate_against_the_vendored_kuberay_crds(overlay):
    ray = objects(overlay, "ray.io")
    assert sorted(o["kind"] for o in ray) == ["RayCluster", "RayJob", "RayService"]
    for obj in ray:
        assert obj["apiVersion"] == "ray.io/v1"
        assert crd_errors(obj) == [], obj["kind"]


@pytest.mark.parametrize("where, typo", [
    (("spec",), ("shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
    (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0), ("resources", "resource")),
    (("spec", "rayClusterSpec"), ("enableInTreeAutoscaling", "enableInTreeAutoScaling")),
])
def test_a_misspelt_field_fails_validation(where, typo):
    (job,) = [o for o in objects("dev", "ray.io") if o["kind"] == "RayJob"]
    node = job
    for key in where:
        node = node[key]
    right, wrong = typo
    node[wrong] = node.pop(right)
    assert any(wrong in e for e in crd_errors(job))


def test_a_misspelt_core_field_fails_validation():
    (mlflow,) = [o for o in objects("dev") if o["kind"] == "Deployment"]
    mlflow["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mlflow, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: nothing to compare against")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_fallback_renderer_gives_what_kubectl_kustomize_gives(overlay):
    assert canonical(render(K8S / "overlays" / overlay)) == canonical(list(rendered(overlay)))


# ---------------------------------------------------------------------------------------------------- consistency


def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return re.search(r">=\s*([\d.]+)", ray)[1]  # e.g. "2.60"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_and_ray_versions_match_the_pinned_ray(overlay):
    ray = pinned_ray()
    for obj in objects(overlay, "ray.io"):
        for _, node in walk(obj):
            if "rayVersion" in node:
                assert str(node["rayVersion"]).startswith(ray + "."), (obj["kind"], node["rayVersion"])
    images = {c["image"] for o in objects(overlay) for _, c in containers(o)}
    ours = {i for i in images if "/moeforge/moeforge:" in i}
    assert ours and all(f"-ray{ray}." in i for i in ours), ours
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (REPO / "infra" / "docker" / dockerfile).read_text()
        assert re.search(rf"^ARG RAY_VERSION={re.escape(ray)}\.\d+$", text, re.M)
        assert "FROM rayproject/ray:${RAY_VERSION}-" in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rayjob_entrypoint_runs_a_real_job_with_a_valid_config(overlay):
    from pipeline.config import load_config

    (job,) = [o for o in objects(overlay, "ray.io") if o["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module = importlib.import_module(argv[2])
    assert callable(module.main) and argv[2].startswith("jobs.")
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(config, sets)  # raises on an unknown preset or key
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rayservice_names_the_serve_builder_with_valid_args(overlay):
    from ray.serve.schema import ServeDeploySchema

    from actors.server import build_app, parse_args

    (svc,) = [o for o in objects(overlay, "ray.io") if o["kind"] == "RayService"]
    schema = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = schema.applications
    module, _, name = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), name) is build_app
    a, cfg, settings = parse_args(app.args)
    assert a.model == f"models:/{cfg.registry.model_name}@champion"
    # the key file the app reads is the mounted Secret, on every pod of the cluster
    mount_dir = str(Path(settings.api_key_file).parent)
    pods = [g["template"]["spec"] for g in [svc["spec"]["rayClusterConfig"]["headGroupSpec"],
                                             *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]]
    for pod in pods:
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == mount_dir]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "moeforge-api-key"
    if settings.num_gpus:
        groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    seen = 0
    for obj in objects(overlay):
        for path, c in containers(obj):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (obj["kind"], obj["metadata"]["name"], path)
            seen += 1
    assert seen >= 10


CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ACCESS_KEY", re.I)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_is_written_in_plaintext(overlay):
    from_secrets = set()
    for obj in objects(overlay):
        assert obj["kind"] != "Secret", "Secrets are created from secret.example, never committed"
        for _, node in walk(obj):
            if CREDENTIAL.search(str(node.get("name", ""))) and "value" in node:
                raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {node['name']} has a literal value")
            if "secretKeyRef" in node:
                from_secrets.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secretName" in node:
                from_secrets.add((node["secretName"], None))
        if obj["kind"] == "RayJob":
            env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"]).get("env_vars", {})
            assert not [k for k in env if CREDENTIAL.search(k)]
    # every Secret the manifests use is one secret.example creates, with that key
    example = (K8S / "secret.example").read_text()
    for name, key in from_secrets:
        command = re.search(rf"create secret generic {re.escape(name)}\b(.*?)(?:\n(?!\s)|$)", example, re.S)
        assert command, f"secret.example does not create {name}"
        if key:
            assert f"--from-literal={key}=" in command[1], f"secret.example gives {name} no key {key}"
    assert "openssl rand" in example and not re.search(r"--from-literal=\w[\w-]*=[\"']?[A-Za-z0-9]{12,}", example)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_probes_use_declared_ports(overlay):
    objs = objects(overlay)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for svc in (o for o in objs if o["kind"] == "Service"):
        (target,) = [w for w in workloads
                     if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        for c in w["spec"]["template"]["spec"]["containers"]:
            names = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in c, f"{w['metadata']['name']} has no {probe}"
                port = c[probe].get("httpGet", {}).get("port")
                assert port is None or port in names


def test_mlflow_is_cluster_internal_with_a_database_and_proxied_artifacts():
    (svc,) = [o for o in objects("dev") if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow"]
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    (dep,) = [o for o in objects("dev") if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(a.split("=", 1) if "=" in a else (a, "") for a in args)
    assert flags["--backend-store-uri"].startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:")
    assert flags["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in flags
    assert "mlflow.moeforge.svc.cluster.local:5000" in flags["--allowed-hosts"].split(",")


def test_the_podmonitor_scrapes_the_ray_pods_metrics_port():
    objs = objects("gpu")
    (monitor,) = [o for o in objs if o["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    pods = [node for o in objs if o["apiVersion"].startswith("ray.io") for _, node in walk(o)
            if "rayStartParams" in node]
    assert pods
    for group in pods:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        assert {"name": port, "containerPort": 8080} in group["template"]["spec"]["containers"][0]["ports"]
    (dashboard,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json

    panels = json.loads(next(iter(dashboard["data"].values())))["panels"]
    assert panels and all(t["expr"].count("ray_") for p in panels for t in p["targets"])


def test_the_images_install_the_way_the_readme_does():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\tsh infra/install\.sh \$\(PY\) dev editable$", makefile, re.M)
    lines = (REPO / "README.md").read_text().splitlines()  # the README's set-up commands are make's
    assert lines[2] == "```bash" and lines[3].startswith("make run ") and lines[4].startswith("make test ")
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (REPO / "infra" / "docker" / dockerfile).read_text()
        assert re.search(r'^RUN sh infra/install\.sh python ', text, re.M), dockerfile
        copied = set(re.findall(r"^COPY --chown=\S+ (\S+) \1$", text, re.M))
        assert {p.split(".")[0] for p in packages} | {"configs"} <= copied, dockerfile  # top-level packages
