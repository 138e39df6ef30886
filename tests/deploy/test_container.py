"""slmtune's container image (deploy/Containerfile, built by deploy/build-image.sh as `make image`
does) running the fine-tuning service with podman, the way deploy/kubernetes runs it.

- The API and a worker in two containers (read-only root file system, uid 10001, no capabilities)
  sharing one host folder as /data/slmtune and a fresh PostgreSQL database; `slmtune migrate` and
  `slmtune keys create` in containers; a job on the tiny model through the official openai client,
  followed by its events; a chat with the fine-tuned model; /readyz and /metrics.
- A job's trainer run exactly as a Kubernetes Job: the worker container runs with
  `--executor kubernetes` against kmock's Kubernetes API emulator, and `PodmanKubelet` below plays
  the cluster: it translates the batch/v1 Job the executor created (slmtune/service/kubernetes.py
  job_manifest: args, env, volume mounts, security context, memory limit) into `podman run --rm`
  with the home claim as the shared folder, and reports the pod's exit back into the Job's status.

Skips, with the reason, when podman is missing or does not work (deploy/setup-podman.sh sets it up)
or PostgreSQL is unreachable. A failing image build fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.kube import kmock_cluster
from tests.service.conftest import PG_URL, training_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SLMTUNE_TEST_IMAGE", "localhost/slmtune:cpu")
UID = 10001  # the image's slmtune user
HOME = "/data/slmtune"  # SLMTUNE_HOME in the image
BASE = "tiny"
NS = "fine-tuning"
HP = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}
JOB_DEADLINE = 300.0  # seconds; a job on the tiny model takes ~30 s here, most of it the trainer's start


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def skip(reason: str):
    print(f"SKIPPED tests/deploy/test_container.py: {reason}", flush=True)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    """The CPU image, built (or found up to date in podman's layer cache) by deploy/build-image.sh."""
    if shutil.which("podman") is None:
        skip("podman is not installed (deploy/setup-podman.sh installs and configures it)")
    info = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        skip(f"`podman info` fails ({last}); deploy/setup-podman.sh configures podman")
    if os.environ.get("SLMTUNE_TEST_IMAGE"):  # an image built elsewhere: use it as it is
        sh("podman", "image", "exists", IMAGE)
        return IMAGE
    start = time.monotonic()
    build = subprocess.run([str(REPO / "deploy/build-image.sh")], cwd=REPO, capture_output=True, text=True,
                           env=os.environ | {"CONTAINER_ENGINE": "podman", "IMAGE": IMAGE}, timeout=3600)
    if build.returncode in (3, 4):  # no working container engine; no base image (debootstrap failed)
        skip(f"deploy/build-image.sh: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, f"deploy/build-image.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    print(f"image {IMAGE} built in {time.monotonic() - start:.0f} s", flush=True)
    return IMAGE


@pytest.fixture(scope="module")
def database():
    """A fresh database on the test PostgreSQL server (the containers reach it on the host's network),
    dropped afterwards."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    name = f"slmtune_ct_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except Exception as err:  # noqa: BLE001
        admin.dispose()
        skip(f"PostgreSQL at {PG_URL} is unreachable: {type(err).__name__}: {str(err).splitlines()[0]}")
    yield PG_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except (urllib.error.URLError, ConnectionError) as err:  # not listening (yet)
        return 0, str(err)


class Stack:
    """The service's containers on one shared home folder and database."""

    def __init__(self, image: str, db: str, root: Path, tiny_llama_dir: Path):
        self.image, self.db, self.run_id = image, db, uuid.uuid4().hex[:8]
        self.home = root / "home"
        # The base model lies on the shared volume: a Kubernetes trainer pod mounts only the home claim.
        shutil.copytree(tiny_llama_dir, self.home / "models" / BASE)
        for path in [self.home, *self.home.rglob("*")]:  # the image's user owns the volume (fsGroup's job)
            if os.geteuid() == 0:
                os.chown(path, UID, UID)
            else:
                path.chmod(0o777 if path.is_dir() else 0o666)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.containers: list[str] = []

    def env(self) -> list[str]:
        values = {"SLMTUNE_DB": self.db, "SLMTUNE_MODELS": json.dumps({BASE: f"{HOME}/models/{BASE}"}),
                  "SLMTUNE_HEARTBEAT_INTERVAL": "0.5", "SLMTUNE_HEARTBEAT_TIMEOUT": "6", "SLMTUNE_POLL_INTERVAL": "0.2",
                  "SLMTUNE_TRAIN_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        return [arg for k, v in values.items() for arg in ("-e", f"{k}={v}")]

    def run_args(self, *extra: str) -> list[str]:
        # as deploy/kubernetes runs them: read-only root (podman mounts tmpfs on /tmp), uid 10001,
        # no capabilities, no privilege escalation; the host's network for PostgreSQL and the API port
        return ["--network", "host", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "--label", f"slmtune-test={self.run_id}", "-v", f"{self.home}:{HOME}", *self.env(), *extra]

    def once(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return sh("podman", "run", "--rm", *self.run_args(), self.image, *args, timeout=timeout)

    def start(self, name: str, *args: str, extra: tuple[str, ...] = ()) -> str:
        name = f"slmtune-test-{self.run_id}-{name}"
        sh("podman", "run", "-d", "--name", name, *self.run_args(*extra), self.image, *args)
        self.containers.append(name)
        return name

    def remove(self, name: str) -> None:
        print(f"--- podman logs {name} (tail)\n{self.logs(name)}", flush=True)  # shown when a test fails
        sh("podman", "rm", "-f", "-t", "10", name, check=False)
        if name in self.containers:
            self.containers.remove(name)

    def logs(self, name: str, lines: int = 40) -> str:
        out = sh("podman", "logs", "--tail", str(lines), name, check=False)
        return out.stdout + out.stderr

    def running(self, name: str) -> bool:
        out = sh("podman", "inspect", "--format", "{{.State.Running}}", name, check=False)
        return out.stdout.strip() == "true"

    def client(self, key: str):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stack(image, database, tiny_llama_dir, tmp_path_factory):
    """`slmtune migrate`, a key from `slmtune keys create`, and `slmtune api --workers 0` running,
    ready (/readyz 200). Workers are each test's own."""
    stack = Stack(image, database, tmp_path_factory.mktemp("containers"), tiny_llama_dir)
    try:
        migrated = stack.once("migrate")
        assert "database schema up to date" in migrated.stderr, migrated.stderr
        stack.key = stack.once("keys", "create", "--tenant", "acme").stdout.strip().splitlines()[-1]
        api = stack.start("api", "api", "--host", "127.0.0.1", "--port", str(stack.port), "--workers", "0")
        deadline = time.monotonic() + 180
        while (status := http_get(stack.url + "/readyz") if stack.running(api) else None) is None or status[0] != 200:
            if status is None:
                raise AssertionError(f"the API container exited:\n{stack.logs(api)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz not 200 after 180 s: {status}\n{stack.logs(api)}")
            time.sleep(0.5)
        yield stack
    finally:
        for name in list(stack.containers):
            stack.remove(name)
        sh("podman", "rm", "-f", "--filter", f"label=slmtune-test={stack.run_id}", check=False)


def run_job(stack: Stack, worker: str, tmp_path: Path, suffix: str):
    """Upload, create a job on the tiny model, follow its events until it ends; (client, job, messages)."""
    client = stack.client(stack.key)
    path = write_jsonl(tmp_path / "train.jsonl", training_rows(12))
    with open(path, "rb") as f:
        training = client.files.create(file=("train.jsonl", f), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=training.id, suffix=suffix, seed=7,
                                         method={"type": "supervised", "supervised": {"hyperparameters": HP}})
    seen: dict[str, str] = {}
    deadline = time.monotonic() + JOB_DEADLINE
    while True:
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):  # oldest first
            if event.id not in seen:
                seen[event.id] = event.message
                print(f"{job.id}: {event.message}", flush=True)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        if not stack.running(worker):
            raise AssertionError(f"the worker container exited:\n{stack.logs(worker)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job.id} still {job.status} after {JOB_DEADLINE:.0f} s; events: "
                                 f"{list(seen.values())}\n{stack.logs(worker)}")
        time.sleep(0.5)
    messages = list(seen.values()) + [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
                                      if e.id not in seen]
    assert job.status == "succeeded", (job.error, messages, stack.logs(worker))
    return client, job, messages


def test_the_service_in_containers(stack, tmp_path):
    worker = stack.start("worker", "worker")
    try:
        client, job, messages = run_job(stack, worker, tmp_path, "containers")
    finally:
        stack.remove(worker)
    assert any(m.startswith("Step 3/3: training loss=") for m in messages), messages
    assert job.fine_tuned_model == f"ft:{BASE}:acme:containers:{job.id}"
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is fact number 3?"}])
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content is not None
    # everything the containers wrote is on the shared volume, as the image's user
    run_dir = stack.home / "service" / "jobs" / job.id / "run"
    assert run_dir.stat().st_uid == UID
    status, body = http_get(stack.url + "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "engine": "ok"}, body
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(stack.url + "/metrics")
    assert status == 200
    jobs = {s.labels["status"]: s.value for f in text_string_to_metric_families(body) if f.name == "slmtune_jobs"
            for s in f.samples}
    assert jobs.get("succeeded", 0) >= 1, jobs


# --- a trainer as a Kubernetes Job ------------------------------------------------------------------
@pytest.fixture
def cluster():
    """kmock's Kubernetes API emulator on 127.0.0.1 (the worker container reaches it on the host's network)."""
    pytest.importorskip("kmock", reason="kmock (the test extra) emulates the Kubernetes API")
    with kmock_cluster() as box:
        yield box


def podman_args(manifest: dict, claims: dict[str, Path]) -> list[str]:
    """`podman run` arguments for the one container of a batch/v1 Job's pod: its image and args (the
    image's entrypoint stays, as Kubernetes keeps it when only `args` is given), env, volumes
    (persistentVolumeClaim: the host folder in `claims`; emptyDir: a tmpfs), user, groups,
    capabilities, privilege escalation and memory limit."""
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert "command" not in container, "the trainer runs the image's entrypoint (slmtune)"
    args = ["--name", manifest["metadata"]["name"], "--network", "host"]
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: only multi-node Jobs take values from the pod (valueFrom)"
        args += ["-e", f"{var['name']}={var['value']}"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            args += ["-v", f"{claims[volume['persistentVolumeClaim']['claimName']]}:{mount['mountPath']}"]
        elif "emptyDir" in volume and mount["mountPath"] == "/dev/shm":
            args += ["--shm-size", "1g"]
        elif "emptyDir" in volume:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
        else:
            raise AssertionError(f"volume {volume} has no podman translation here")
    security = pod.get("securityContext", {}) | container.get("securityContext", {})
    if "runAsUser" in security:
        args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
    if "fsGroup" in security:
        args += ["--group-add", str(security["fsGroup"])]
    for cap in security.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(limits["memory"])]
    assert not [k for k in limits if k not in ("memory", "cpu")], f"{limits}: no GPUs here"
    if "cpu" in limits:
        args += ["--cpus", str(limits["cpu"])]
    return [*args, container["image"], *container["args"]]


class PodmanKubelet:
    """Plays the Job controller and the kubelet for each Job created in the emulator: a pod object
    (what the executor lists), the Job's container run with `podman run --rm`, and the pod's and the
    Job's status from its exit code. A Job deleted while its container runs (cancel) gets SIGTERM."""

    def __init__(self, cluster, claims: dict[str, Path], log_dir: Path):
        self.cluster, self.claims, self.log_dir = cluster, claims, log_dir
        self.seen: list[dict] = []
        self.commands: list[list[str]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        try:
            while not self.stop.is_set():
                for kjob in self.cluster["batch"].list_namespaced_job(NS).items:
                    if kjob.metadata.name not in {m["metadata"]["name"] for m in self.seen}:
                        raw = self.cluster["api"].sanitize_for_serialization(kjob)
                        self.seen.append(raw)
                        threading.Thread(target=self._run_pod, args=(raw,), daemon=True).start()
                self.stop.wait(0.1)
        except BaseException as err:  # noqa: BLE001 - reported by close()
            self.errors.append(err)

    def _run_pod(self, job: dict):
        try:
            self._run(job)
        except BaseException as err:  # noqa: BLE001
            self.errors.append(err)

    def _run(self, job: dict):
        name = job["metadata"]["name"]
        template = job["spec"]["template"]
        pod = f"{name}-pod"
        self.cluster["core"].create_namespaced_pod(NS, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "labels": template["metadata"]["labels"]},
            "spec": template["spec"], "status": {"phase": "Running"}})
        cmd = ["podman", "run", "--rm", *podman_args(job, self.claims)]
        self.commands.append(cmd)
        print("kubelet:", " ".join(cmd), flush=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out)
        while proc.poll() is None:
            try:
                self.cluster["batch"].read_namespaced_job(name, NS)
            except Exception as err:  # noqa: BLE001 - 404: deleted (cancel): SIGTERM, then the pod goes
                if getattr(err, "status", None) == 404:
                    sh("podman", "stop", "-t", "120", name, check=False, timeout=180)
                    proc.wait(60)
                    self.cluster["core"].delete_namespaced_pod(pod, NS)
                    return
            time.sleep(0.2)
        code = proc.returncode
        print(f"kubelet: {name} exited with {code}\n{log.read_text(errors='replace')[-2000:]}", flush=True)
        self.cluster["core"].patch_namespaced_pod_status(pod, NS, {"status": {
            "phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
                {"name": "trainer", "image": template["spec"]["containers"][0]["image"], "imageID": "",
                 "ready": False, "restartCount": 0,
                 "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}}]}})
        condition = ({"type": "Complete", "status": "True"} if code == 0 else
                     {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                      "message": "Job has reached the specified backoff limit"})
        self.cluster["batch"].patch_namespaced_job_status(name, NS, {"status": {"conditions": [condition]}})

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for job in self.seen:
            sh("podman", "rm", "-f", job["metadata"]["name"], check=False)
        assert not self.errors, self.errors


def test_a_trainer_runs_as_the_kubernetes_executors_job_manifest_says(stack, cluster, tmp_path):
    claim = "slmtune-home"
    kubelet = PodmanKubelet(cluster, {claim: stack.home}, tmp_path)
    kubeconfig = tmp_path / "kube"
    kubeconfig.mkdir()
    (kubeconfig / "config").write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": cluster["url"]}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}]}))
    kubeconfig.chmod(0o755)
    (kubeconfig / "config").chmod(0o644)
    # the worker as deploy/kubernetes/base/worker-deployment.yaml runs it, outside the cluster
    worker = stack.start("k8s-worker", "worker", "--executor", "kubernetes", extra=(
        "-v", f"{kubeconfig}:/kube:ro", "-e", "KUBECONFIG=/kube/config", "-e", f"SLMTUNE_KUBERNETES_NAMESPACE={NS}",
        "-e", f"SLMTUNE_KUBERNETES_IMAGE={stack.image}", "-e", f"SLMTUNE_KUBERNETES_HOME_CLAIM={claim}",
        "-e", "SLMTUNE_KUBERNETES_RETRY_BACKOFF=0"))
    try:
        client, job, messages = run_job(stack, worker, tmp_path, "k8s")
    finally:
        stack.remove(worker)
        kubelet.close()
    assert len(kubelet.seen) == 1, [m["metadata"]["name"] for m in kubelet.seen]
    [manifest] = kubelet.seen
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    events_file = f"{HOME}/service/jobs/{job.id}/events-1.jsonl"
    assert container["args"][0] == "train" and container["args"][-4:] == [
        "--json-events", "--no-progress", "--events-file", events_file], container["args"]
    assert {"name": "SLMTUNE_HOME", "value": HOME} in container["env"]
    assert f"{stack.home}:{HOME}" in kubelet.commands[0]
    # the events came from the trainer's container through the events file on the shared volume
    assert any(m.startswith("Step 3/3: training loss=") for m in messages), messages
    assert (stack.home / "service" / "jobs" / job.id / "events-1.jsonl").stat().st_uid == UID
    assert job.fine_tuned_model == f"ft:{BASE}:acme:k8s:{job.id}"
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is fact number 3?"}])
    assert reply.model == job.fine_tuned_model
