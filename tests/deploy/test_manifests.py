"""deploy/kubernetes: the overlays rendered with `kubectl kustomize` (offline, no cluster), every
object validated against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields are
errors), and the properties the service relies on checked on the rendered objects.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

KUSTOMIZE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAYS = {"cpu": "cpu", "gpu": "cuda"}  # overlay -> the slmtune image tag it pins
HOME = "/data/slmtune"
GPU = "nvidia.com/gpu"
SLMTUNE_CONTAINERS = {"api", "worker", "migrate"}


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not on PATH: these tests render deploy/kubernetes with `kubectl kustomize` "
                    "(kubectl >= 1.27, kustomize v5)")
    return path


@lru_cache(maxsize=None)
def _render_text(directory: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return proc.stdout


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` renders (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(str(directory))) if doc]


@pytest.fixture(params=sorted(OVERLAYS))
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay) -> list[dict]:
    return render(KUSTOMIZE / "overlays" / overlay)


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")]


def container(objects: list[dict], kind: str, name: str, container_name: str) -> dict:
    (found,) = [c for c in pod_spec(one(objects, kind, name))["containers"] if c["name"] == container_name]
    return found


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def secret_value(objects: list[dict], name: str, key: str) -> str:
    secret = one(objects, "Secret", name)
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def api(objects):
    return container(objects, "Deployment", "slmtune-api", "api")


def worker(objects):
    return container(objects, "Deployment", "slmtune-worker", "worker")


def migrate(objects):
    return container(objects, "Job", "slmtune-migrate", "migrate")


def slmtune_pods(objects) -> list[tuple[str, dict, dict]]:
    """(name, pod spec, container) of every slmtune container."""
    return [(o["metadata"]["name"], pod_spec(o), c) for o in workloads(objects) for c in pod_spec(o)["containers"]
            if c["name"] in SLMTUNE_CONTAINERS]


# --- schemas ------------------------------------------------------------------------------------

def validate_all(objects: list[dict]) -> str:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the test extra: pip install -e '.[test]'")
    version = kubernetes_validate.latest_version()
    assert tuple(int(p) for p in version.split(".")[:2]) >= (1, 33), version
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not a valid Kubernetes {version} object: "
                        f"{err.message} at {'/'.join(map(str, err.path))}")
    return version


def test_every_rendered_object_is_valid_in_strict_mode(objects):
    validate_all(objects)


def test_the_validator_rejects_a_misspelt_field(objects):
    """The strict validation above is not vacuous: a typo in a probe's name fails it."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = one(objects, "Deployment", "slmtune-api")
    pod_spec(deployment)["containers"][0]["livenessprobe"] = pod_spec(deployment)["containers"][0].pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessprobe"):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_the_base_needs_no_database_secret_or_ingress_of_its_own():
    """Production uses the base with an external database: no PostgreSQL, placeholder secrets or
    Ingress come with it."""
    objects = render(KUSTOMIZE / "base")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Secret", "StatefulSet", "Ingress"}, kinds
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job", "PodDisruptionBudget", "Role"} <= kinds
    validate_all(objects)


def test_ingress_component(tmp_path):
    """Enabled as docs/kubernetes.md says: an overlay of your own with the component."""
    assert not [o for o in render(KUSTOMIZE / "overlays" / "cpu") if o["kind"] == "Ingress"]
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    (tree / "overlays" / "mine").mkdir()
    (tree / "overlays" / "mine" / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../cpu"], "components": ["../../components/ingress"]}))
    objects = render(tree / "overlays" / "mine")
    validate_all(objects)
    ingress = one(objects, "Ingress", "slmtune-api")
    backends = [p["backend"]["service"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    service = one(objects, "Service", "slmtune-api")
    assert backends and all(b["name"] == "slmtune-api" for b in backends)
    assert all(b["port"]["name"] in {p["name"] for p in service["spec"]["ports"]} for b in backends)
    assert ingress["metadata"]["labels"]["app.kubernetes.io/name"] == "slmtune"


# --- objects and labels -------------------------------------------------------------------------

def test_expected_objects_namespace_agnostic_and_labelled(objects):
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "slmtune-api"), ("Service", "slmtune-api"), ("PodDisruptionBudget", "slmtune-api"),
            ("Deployment", "slmtune-worker"), ("ServiceAccount", "slmtune-worker"), ("Role", "slmtune-worker"),
            ("RoleBinding", "slmtune-worker"), ("Job", "slmtune-migrate"), ("PersistentVolumeClaim", "slmtune-home"),
            ("StatefulSet", "slmtune-postgres"), ("Service", "slmtune-postgres")} <= names
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert "namespace" not in obj["metadata"], f"{where}: the manifests are namespace-agnostic"
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "slmtune", where
        assert labels.get("app.kubernetes.io/part-of") == "slmtune", where
    for obj in workloads(objects):  # the pods carry them too (kubectl get pods -l app.kubernetes.io/name=slmtune)
        assert obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "slmtune"


# --- images -------------------------------------------------------------------------------------

def test_images_per_overlay(objects, overlay):
    tag = OVERLAYS[overlay]
    pods = slmtune_pods(objects)
    assert {c["name"] for _, _, c in pods} == SLMTUNE_CONTAINERS
    for name, _, c in pods:
        assert c["image"] == f"slmtune:{tag}", f"{name}/{c['name']}: {c['image']}"
    # the trainer pods the worker creates run the same image
    assert env_of(worker(objects))["SLMTUNE_KUBERNETES_IMAGE"]["value"] == f"slmtune:{tag}"
    assert container(objects, "StatefulSet", "slmtune-postgres", "postgres")["image"].startswith("postgres:")


def test_set_image_in_an_overlay_reaches_every_container_and_the_trainer(tmp_path, overlay):
    """What `kustomize edit set image slmtune=registry.example.com/ml/slmtune:1.2.3` writes into
    an overlay's kustomization.yaml changes the API, worker, migration and trainer images alike."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUSTOMIZE, tree)
    path = tree / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    (entry,) = [i for i in kustomization["images"] if i["name"] == "slmtune"]
    entry.update(newName="registry.example.com/ml/slmtune", newTag="1.2.3")
    path.write_text(yaml.safe_dump(kustomization))
    objects = render(tree / "overlays" / overlay)
    wanted = "registry.example.com/ml/slmtune:1.2.3"
    assert [c["image"] for _, _, c in slmtune_pods(objects)] == [wanted] * 3
    assert env_of(worker(objects))["SLMTUNE_KUBERNETES_IMAGE"]["value"] == wanted


# --- commands, environment, secrets -------------------------------------------------------------

def command(c: dict) -> list[str]:
    return c.get("command", []) + c.get("args", [])


def test_commands(objects):
    assert command(api(objects)) == ["slmtune", "api", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
    assert command(worker(objects)) == ["slmtune", "worker", "--executor", "kubernetes"]
    assert command(migrate(objects)) == ["slmtune", "migrate"]
    assert one(objects, "Job", "slmtune-migrate")["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_environment_and_secrets(objects):
    for name, _, c in slmtune_pods(objects):
        env = env_of(c)
        assert env["SLMTUNE_HOME"]["value"] == HOME, name
        ref = env["SLMTUNE_DB"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "url" and ref["name"].startswith("slmtune-db") and not ref.get("optional"), name
        url = secret_value(objects, ref["name"], "url")  # the (hash-suffixed) Secret is rendered with it
        assert url.startswith("postgresql+psycopg://"), url
    admin = env_of(api(objects))["SLMTUNE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert admin["key"] == "token" and admin["name"].startswith("slmtune-admin")
    assert secret_value(objects, admin["name"], "token")
    env = env_of(worker(objects))
    assert env["SLMTUNE_EXECUTOR"]["value"] == "kubernetes"
    assert env["SLMTUNE_KUBERNETES_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["SLMTUNE_KUBERNETES_HOME_CLAIM"]["value"] == "slmtune-home"
    one(objects, "PersistentVolumeClaim", env["SLMTUNE_KUBERNETES_HOME_CLAIM"]["value"])
    trainer_account = one(objects, "ServiceAccount", env["SLMTUNE_KUBERNETES_SERVICE_ACCOUNT"]["value"])
    assert trainer_account["automountServiceAccountToken"] is False  # trainers get no API token
    assert env_of(api(objects))["SLMTUNE_WORKERS"]["value"] == "0"


def test_placeholder_secrets_are_marked_and_consistent(objects):
    """The example secrets are placeholders (never real values), and the in-cluster PostgreSQL's
    password and host are the ones in the service's database URL."""
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert secrets
    for secret in secrets:
        for key in secret.get("data", {}):
            assert "CHANGE-ME" in secret_value(objects, secret["metadata"]["name"], key), secret["metadata"]["name"]
    ref = env_of(api(objects))["SLMTUNE_DB"]["valueFrom"]["secretKeyRef"]
    url = urlsplit(secret_value(objects, ref["name"], "url"))
    postgres = container(objects, "StatefulSet", "slmtune-postgres", "postgres")
    penv = env_of(postgres)
    pref = penv["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert url.password == secret_value(objects, pref["name"], pref["key"])
    assert url.username == penv["POSTGRES_USER"]["value"] and url.path == "/" + penv["POSTGRES_DB"]["value"]
    service = one(objects, "Service", url.hostname)
    assert service["spec"]["clusterIP"] == "None"  # headless, for the StatefulSet
    assert url.port in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= pod_labels(one(objects, "StatefulSet", "slmtune-postgres")).items()
    statefulset = one(objects, "StatefulSet", "slmtune-postgres")
    assert statefulset["spec"]["serviceName"] == url.hostname
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in {m["name"] for m in postgres["volumeMounts"]}


# --- storage ------------------------------------------------------------------------------------

def test_shared_home_volume_everywhere(objects):
    claim = one(objects, "PersistentVolumeClaim", "slmtune-home")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, spec, c in slmtune_pods(objects):
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == HOME]
        assert len(mounts) == 1, f"{name}: {HOME} not mounted"
        volume = volumes[mounts[0]["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == "slmtune-home", name
        assert not mounts[0].get("readOnly"), name
        assert env_of(c)["SLMTUNE_HOME"]["value"] == mounts[0]["mountPath"]


# --- probes, service, availability --------------------------------------------------------------

def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


def test_api_probes(objects):
    c = api(objects)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert (get["path"], port_number(c, get["port"])) == (path, 8000), probe
    startup = c["startupProbe"]
    # model loading (and the first pull) happens before the server answers: minutes, not seconds
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_service_reaches_the_api_pods_only(objects):
    service = one(objects, "Service", "slmtune-api")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port_number(api(objects), port["targetPort"]) == 8000
    selector = service["spec"]["selector"].items()
    assert selector <= pod_labels(one(objects, "Deployment", "slmtune-api")).items()
    assert not selector <= pod_labels(one(objects, "Deployment", "slmtune-worker")).items()
    assert not selector <= pod_labels(one(objects, "Job", "slmtune-migrate")).items()


def test_pdb_and_replicas(objects):
    deployment = one(objects, "Deployment", "slmtune-api")
    pdb = one(objects, "PodDisruptionBudget", "slmtune-api")
    assert deployment["spec"]["replicas"] == 2
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()


# --- GPUs ---------------------------------------------------------------------------------------

def test_gpus_only_in_the_gpu_overlay(objects, overlay):
    asked = {(o["metadata"]["name"], c["name"]): {**c["resources"].get("requests", {}), **c["resources"]["limits"]}
             for o in workloads(objects) for c in pod_spec(o)["containers"]}
    env = env_of(worker(objects))
    api_pod = pod_spec(one(objects, "Deployment", "slmtune-api"))
    if overlay == "cpu":
        assert not [k for k, r in asked.items() if GPU in r], asked
        assert env["SLMTUNE_KUBERNETES_GPUS"]["value"] == "0"
        assert not api_pod.get("tolerations") and not api_pod.get("nodeSelector")
        return
    limits = api(objects)["resources"]["limits"]
    assert limits[GPU] == "1"
    assert [k for k, r in asked.items() if GPU in r] == [("slmtune-api", "api")]  # the worker itself needs none
    assert int(env["SLMTUNE_KUBERNETES_GPUS"]["value"]) >= 1
    assert env["SLMTUNE_KUBERNETES_GPU_RESOURCE"]["value"] == GPU
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in api_pod["tolerations"]
    assert api_pod["nodeSelector"]
    # the trainers' pods land on the same GPU pool as the API
    assert json.loads(env["SLMTUNE_KUBERNETES_TOLERATIONS"]["value"]) == api_pod["tolerations"]
    assert json.loads(env["SLMTUNE_KUBERNETES_NODE_SELECTOR"]["value"]) == api_pod["nodeSelector"]


# --- security -----------------------------------------------------------------------------------

def test_security_contexts_and_resources(objects):
    for obj in workloads(objects):
        spec = pod_spec(obj)
        pod_security = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{obj['kind']} {obj['metadata']['name']}/{c['name']}"
            security = {**pod_security, **c.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("privileged"), where
            assert security.get("readOnlyRootFilesystem") is True, where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: a read-only root needs a writable /tmp"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: {kind}"
            if c["name"] in SLMTUNE_CONTAINERS:
                assert security.get("runAsUser") == 10001, where  # the image's user slmtune


# --- RBAC ---------------------------------------------------------------------------------------

WORKER_NEEDS = [  # (API group, resource, verb): what the Kubernetes executor calls
    *(("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")),
    *(("", "pods", v) for v in ("get", "list", "watch", "delete")),  # delete: pods outliving a stop's grace
    ("", "pods/log", "get"),
    *(("", "services", v) for v in ("create", "get", "delete")),
]


def allows(role: dict, group: str, resource: str, verb: str) -> bool:
    return any(group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
               and verb in rule.get("verbs", []) and not rule.get("resourceNames") for rule in role["rules"])


def test_worker_rbac(objects):
    deployment = one(objects, "Deployment", "slmtune-worker")
    account = pod_spec(deployment)["serviceAccountName"]
    assert account == "slmtune-worker"
    one(objects, "ServiceAccount", account)
    assert pod_spec(deployment).get("automountServiceAccountToken", True) is not False
    bindings = [b for b in objects if b["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
    assert bindings, "no RoleBinding for the worker's ServiceAccount"
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]  # namespaced only
    roles = [one(objects, "Role", b["roleRef"]["name"]) for b in bindings if b["roleRef"]["kind"] == "Role"]
    missing = [need for need in WORKER_NEEDS if not any(allows(r, *need) for r in roles)]
    assert not missing, f"the worker's Role lacks {missing}"
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert not {"secrets", "configmaps"} & set(rule["resources"]), rule
    # the other pods get no Kubernetes API token at all
    for name, kind in (("slmtune-api", "Deployment"), ("slmtune-migrate", "Job")):
        spec = pod_spec(one(objects, kind, name))
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["serviceAccountName"] != account, name
