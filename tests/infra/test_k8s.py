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
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.infra.kustomize import CLUSTER_SCOPED, canonical, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
CRDS = REPO / "infra" / "schemas" / "kuberay"
OVERLAYS = ["dev", "gpu", "gpu-fsdp"]
KUBERNETES_VERSION = "1.33.0"  # a Kubernetes version KubeRay v1.7 supports; the schemas ship in kubernetes-validate
CONTAINER_LISTS = ("containers", "initContainers")


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize` when available (what users run), else the repository's small renderer."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
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
    return [
        ((*path, key, i), c)
        for path, node in walk(obj)
        for key in CONTAINER_LISTS
        if isinstance(node.get(key), list) and path and path[-1] == "spec"
        for i, c in enumerate(node[key])
    ]


# ---------------------------------------------------------------------------------------------------- schemas


def closed(schema: dict) -> dict:
    """The CRD's schema with unknown fields rejected, as the API server does for structural schemas."""
    schema = copy.deepcopy(schema)
    for _, node in walk(schema):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
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
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]


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


@pytest.mark.parametrize(
    "where, typo",
    [
        (("spec",), ("shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0), ("resources", "resource")),
        (("spec", "rayClusterSpec"), ("enableInTreeAutoscaling", "enableInTreeAutoScaling")),
    ],
)
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
    cfg = load_config(config, sets)  # raises on an unknown preset or key
    assert cfg.train.parallelism == ("fsdp" if overlay == "gpu-fsdp" else "ddp")
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
    pods = [
        g["template"]["spec"]
        for g in [
            svc["spec"]["rayClusterConfig"]["headGroupSpec"],
            *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"],
        ]
    ]
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
        (target,) = [
            w
            for w in workloads
            if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
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
    container = dep["spec"]["template"]["spec"]["containers"][0]
    flags = dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"])
    assert flags["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in flags
    assert "mlflow.moeforge.svc.cluster.local:5000" in flags["--allowed-hosts"].split(",")
    # the store URI, password included, comes whole from a Secret: nothing of it on the command line
    assert "--backend-store-uri" not in flags
    assert not any("postgresql" in a or "PASSWORD" in a for a in container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "moeforge-mlflow-db", "key": "uri"}
    assert 'moeforge-mlflow-db --from-literal=uri="postgresql://mlflow:${PG_PASSWORD}@postgres:5432/mlflow"' in (
        K8S / "secret.example"
    ).read_text().replace("\\\n  ", "")


# ---------------------------------------------------------------------------------------------------- security


def pod_templates(obj: dict) -> list[tuple[tuple, dict]]:
    """Every pod template in an object (workloads, Jobs, each Ray group, the RayJob's submitter): (path, template)."""
    return [
        (path, node)
        for path, node in walk(obj)
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"] and "metadata" in node
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_without_privileges_on_a_read_only_root(overlay):
    seen = 0
    for obj in objects(overlay):
        for path, template in pod_templates(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']} {'/'.join(map(str, path))}"
            pod = template["spec"].get("securityContext", {})
            assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where
            assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            for c in template["spec"]["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, (where, c["name"])
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], (where, c["name"])
                assert sc.get("readOnlyRootFilesystem") is True, (where, c["name"])
                assert not sc.get("privileged") and not sc.get("capabilities", {}).get("add"), (where, c["name"])
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], (where, c["name"])  # writable
            seen += 1
    for obj in objects(overlay, "ray.io"):  # KubeRay's autoscaler sidecar is configured on the cluster spec
        for _, node in walk(obj):
            if "autoscalerOptions" in node:
                sc = node["autoscalerOptions"]["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert seen >= 11


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_cluster_requires_ray_token_auth(overlay):
    specs = []
    for obj in objects(overlay, "ray.io"):
        spec = {
            "RayCluster": lambda o: o["spec"],
            "RayJob": lambda o: o["spec"]["rayClusterSpec"],
            "RayService": lambda o: o["spec"]["rayClusterConfig"],
        }[obj["kind"]](obj)
        assert spec["authOptions"]["mode"] == "token", obj["kind"]
        specs.append(obj["kind"])
    assert sorted(specs) == ["RayCluster", "RayJob", "RayService"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_minio_credentials_are_scoped_per_consumer(overlay):
    """Root credentials: MinIO and its setup Job only. MLflow and the pipeline's Ray pods have users of their own,
    each allowed one bucket; the serving cluster has no S3 credentials at all."""
    users: dict[str, set] = {}
    for obj in objects(overlay):
        for _, template in pod_templates(obj):
            labels = template["metadata"].get("labels", {})
            who = labels.get("app.kubernetes.io/instance") or labels.get("app.kubernetes.io/name")
            for _, node in walk(template):
                if "secretKeyRef" in node and node["secretKeyRef"]["name"].startswith("moeforge-minio"):
                    users.setdefault(node["secretKeyRef"]["name"], set()).add(who)
    assert users["moeforge-minio"] == {"minio", "minio-buckets"}
    assert users["moeforge-minio-mlflow"] == {"mlflow", "minio-buckets"}
    assert users["moeforge-minio-ray"] == {"moeforge", "moeforge-pipeline", "minio-buckets"}
    assert "moeforge-serve" not in set().union(*users.values())
    (job,) = [o for o in objects(overlay) if o["kind"] == "Job" and o["metadata"]["name"] == "minio-buckets"]
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert 'policy attach store mlflow-rw --user "$MLFLOW_ACCESS_KEY"' in script
    assert 'policy attach store moeforge-rw --user "$RAY_ACCESS_KEY"' in script
    assert '"Resource": ["arn:aws:s3:::$bucket/*"]' in script and "s3:*" not in script  # one bucket, listed actions
    (svc,) = [o for o in objects(overlay) if o["kind"] == "Service" and o["metadata"]["name"] == "minio"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [9000]  # no console


# ---------------------------------------------------------------------------------------------------- network


NAMESPACE = "moeforge"
MONITORING = "monitoring"  # kube-prometheus-stack's namespace: Prometheus, Grafana, Alertmanager, the operator


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace) or an address outside any pod (ip=True: the Kubernetes API, the internet)."""

    labels: tuple = ()
    namespace: str = NAMESPACE
    ip: bool = False


def pod(labels: dict, namespace: str = NAMESPACE) -> Endpoint:
    return Endpoint(tuple(sorted(labels.items())), namespace)


def named(name: str, namespace: str = NAMESPACE, **more) -> Endpoint:
    return pod({"app.kubernetes.io/name": name, **more}, namespace)


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator reads matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def peer_matches(peer: dict, e: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return e.ip and peer["ipBlock"]["cidr"] == "0.0.0.0/0"
    if e.ip:
        return False
    labels = dict(e.labels)
    if "namespaceSelector" in peer:
        ns = {"kubernetes.io/metadata.name": e.namespace}
        return selects(peer["namespaceSelector"], ns) and selects(peer.get("podSelector", {}), labels)
    return e.namespace == policy_namespace and selects(peer["podSelector"], labels)  # a bare podSelector: own ns


def rule_allows(rule: dict, peers_key: str, other: Endpoint, port: int, protocol: str, policy_namespace: str) -> bool:
    ports = rule.get("ports")
    if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
        return False
    peers = rule.get(peers_key)
    return not peers or any(peer_matches(p, other, policy_namespace) for p in peers)


def namespace_of(obj: dict) -> str:
    """Where `kubectl apply` puts a namespaced object: its own namespace, else the caller's current one."""
    return obj["metadata"].get("namespace") or "<kubectl's current namespace>"


def allowed(policies: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """NetworkPolicy semantics for one connection: both the destination's ingress and the source's egress must
    allow it, each judged by the policies of that pod's own namespace (a namespace without policies is open)."""

    def side(e: Endpoint, direction: str, peers_key: str, other: Endpoint) -> bool:
        if e.ip:
            return True  # an address outside the cluster's pods: no policy applies to it
        mine = [
            p
            for p in policies
            if namespace_of(p) == e.namespace
            and direction in p["spec"]["policyTypes"]
            and selects(p["spec"]["podSelector"], dict(e.labels))
        ]
        return not mine or any(
            rule_allows(r, peers_key, other, port, protocol, namespace_of(p))
            for p in mine
            for r in p["spec"].get(direction.lower(), [])
        )

    return side(dst, "Ingress", "from", src) and side(src, "Egress", "to", dst)


CLUSTERS = {"standing": "moeforge", "job": "moeforge-pipeline", "serve": "moeforge-serve"}
ROLES = {
    **{name: named(name) for name in ("postgres", "minio", "mlflow")},
    "buckets": named("minio-buckets"),
    **{
        f"{short}-{part}": pod(
            {
                "app.kubernetes.io/name": "ray",
                "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/component": component,
            }
        )
        for short, instance in CLUSTERS.items()
        for part, component in (("head", "head"), ("worker", "cpu-worker"))
    },
    "submitter": named("ray-job-submitter", **{"app.kubernetes.io/instance": "moeforge-pipeline"}),
    "dns": pod({"k8s-app": "kube-dns"}, "kube-system"),
    "operator": named("kuberay-operator", "kuberay-system"),
    "ingress": named("ingress-nginx", "ingress-nginx"),
    "prometheus": named("prometheus", MONITORING),
    "grafana": named("grafana", MONITORING),
    "alertmanager": named("alertmanager", MONITORING),
    "kube-state-metrics": named("kube-state-metrics", MONITORING),
    "prometheus-operator": pod({"app": "kube-prometheus-stack-operator"}, MONITORING),
    "intruder-in-monitoring": pod({"app": "debug-shell"}, MONITORING),
    "other-pod": pod({"app": "anything"}, "default"),
    "intruder-in-namespace": pod({"app": "debug-shell"}),
    "outside": Endpoint(ip=True),
}
EXPECT = [  # (source, destination, port, allowed)
    ("mlflow", "postgres", 5432, True),
    ("job-worker", "postgres", 5432, False),
    ("serve-head", "postgres", 5432, False),
    ("intruder-in-namespace", "postgres", 5432, False),
    ("mlflow", "minio", 9000, True),
    ("buckets", "minio", 9000, True),
    ("job-worker", "minio", 9000, True),
    ("standing-worker", "minio", 9000, True),
    ("serve-worker", "minio", 9000, False),
    ("other-pod", "minio", 9000, False),
    ("mlflow", "minio", 9001, False),
    ("submitter", "minio", 9000, False),
    ("job-worker", "mlflow", 5000, True),
    ("serve-worker", "mlflow", 5000, True),
    ("standing-head", "mlflow", 5000, True),
    ("other-pod", "mlflow", 5000, False),
    ("ingress", "mlflow", 5000, False),
    ("submitter", "mlflow", 5000, False),
    ("postgres", "mlflow", 5000, False),
    ("submitter", "job-head", 8265, True),
    ("other-pod", "job-head", 8265, False),
    ("other-pod", "standing-head", 8265, False),
    ("intruder-in-namespace", "standing-head", 8265, False),
    ("job-worker", "job-head", 6379, True),
    ("serve-worker", "serve-head", 6379, True),
    ("standing-worker", "job-head", 6379, False),
    ("serve-worker", "standing-head", 6379, False),
    ("job-head", "serve-worker", 10002, False),
    ("operator", "standing-head", 8265, True),
    ("operator", "serve-head", 8265, True),
    ("operator", "job-worker", 52365, True),
    ("operator", "job-head", 6379, False),
    ("ingress", "serve-head", 8000, True),
    ("outside", "serve-worker", 8000, True),
    ("outside", "serve-head", 8265, False),
    ("outside", "standing-head", 8000, False),
    ("standing-head", "outside", 443, True),
    ("serve-head", "outside", 6443, True),
    ("standing-worker", "outside", 443, False),
    ("mlflow", "outside", 443, False),
    ("job-worker", "outside", 80, False),
    ("serve-head", "outside", 80, False),
]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_allow_what_each_component_needs(overlay):
    policies = [o for o in objects(overlay) if o["kind"] == "NetworkPolicy"]
    (deny,) = [p for p in policies if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    wrong = [
        (src, dst, port, want)
        for src, dst, port, want in EXPECT
        if allowed(policies, ROLES[src], ROLES[dst], port) is not want
    ]
    assert not wrong, wrong
    for role in ROLES.values():  # every pod of the namespace resolves names
        if role.namespace == NAMESPACE:
            assert allowed(policies, role, ROLES["dns"], 53, "UDP")
    scraped = allowed(policies, ROLES["prometheus"], ROLES["job-worker"], 8080)
    assert scraped is overlay.startswith("gpu")  # the monitoring component opens the metrics port where installed


MONITORING_EXPECT = [  # (source, destination, port, allowed) where the monitoring component is installed
    ("grafana", "prometheus", 9090, True),  # Grafana's data source
    ("prometheus", "prometheus", 9090, True),  # it scrapes itself
    ("prometheus", "alertmanager", 9093, True),
    ("prometheus", "kube-state-metrics", 8080, True),
    ("prometheus", "grafana", 3000, True),  # Grafana's own metrics
    ("outside", "prometheus-operator", 10250, True),  # the API server calls the operator's admission webhook
    ("intruder-in-monitoring", "prometheus", 9090, False),
    ("intruder-in-monitoring", "grafana", 3000, False),
    ("intruder-in-namespace", "prometheus", 9090, False),
    ("job-worker", "alertmanager", 9093, False),
    ("other-pod", "grafana", 3000, False),
    ("outside", "grafana", 3000, False),  # people reach Grafana with `kubectl port-forward`
    ("outside", "prometheus", 9090, False),
    ("grafana", "alertmanager", 9093, False),
    ("prometheus", "job-worker", 8080, True),  # the PodMonitor's scrape of the Ray pods
    ("prometheus", "job-worker", 8265, False),
]


def test_every_namespace_the_manifests_deploy_into_denies_ingress_by_default():
    """A namespace that receives any of our objects gets a default-deny ingress policy of ours there too, so what
    the manifests place in it is reachable only through the allows listed beside it."""
    objs = objects("gpu")  # the overlay that includes everything, monitoring too
    namespaces = {namespace_of(o) for o in objs if o["kind"] not in CLUSTER_SCOPED}
    denies = {
        namespace_of(p)
        for p in objs
        if p["kind"] == "NetworkPolicy"
        and p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"]["policyTypes"]
        and not p["spec"].get("ingress")
    }
    assert namespaces == {NAMESPACE, MONITORING}, namespaces
    assert namespaces <= denies, f"no default-deny ingress in {sorted(namespaces - denies)}"


def test_the_monitoring_namespace_lets_in_only_what_prometheus_and_grafana_need():
    policies = [o for o in objects("gpu") if o["kind"] == "NetworkPolicy"]
    wrong = [
        (src, dst, port, want)
        for src, dst, port, want in MONITORING_EXPECT
        if allowed(policies, ROLES[src], ROLES[dst], port) is not want
    ]
    assert not wrong, wrong
    objs = objects("gpu")
    (monitor,) = [o for o in objs if o["kind"] == "PodMonitor"]
    (dashboard,) = [o for o in objs if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
    assert namespace_of(monitor) == NAMESPACE  # a PodMonitor selects pods of its own namespace
    assert namespace_of(dashboard) == MONITORING  # Grafana's sidecar reads dashboards from its own namespace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_of_the_namespace_is_covered_by_an_allow_policy(overlay):
    """No pod lives on the default deny alone (it would be cut off) or outside every policy (it would be open)."""
    policies = [o for o in objects(overlay) if o["kind"] == "NetworkPolicy"]
    allows = [p for p in policies if p["metadata"]["name"] not in ("default-deny", "dns")]
    kinds = set()
    for obj in objects(overlay):
        for path, template in pod_templates(obj):
            labels = template["metadata"].get("labels", {})
            assert labels, (obj["kind"], obj["metadata"]["name"], path)
            assert any(selects(p["spec"]["podSelector"], labels) for p in allows), (obj["kind"], labels)
            if labels.get("app.kubernetes.io/component") != "gpu-worker":  # same policies as the CPU workers
                assert pod(labels) in ROLES.values(), labels  # the connection matrix above covers this pod
            kinds.add(obj["kind"])
    assert kinds >= {"Deployment", "StatefulSet", "Job", "RayCluster", "RayJob", "RayService"}


def test_the_podmonitor_scrapes_the_ray_pods_metrics_port():
    objs = objects("gpu")
    (monitor,) = [o for o in objs if o["kind"] == "PodMonitor"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    pods = [
        node for o in objs if o["apiVersion"].startswith("ray.io") for _, node in walk(o) if "rayStartParams" in node
    ]
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
        assert re.search(r"^RUN sh infra/install\.sh python ", text, re.M), dockerfile
        copied = set(re.findall(r"^COPY --chown=\S+ (\S+) \1$", text, re.M))
        assert {p.split(".")[0] for p in packages} | {"configs"} <= copied, dockerfile  # top-level packages
