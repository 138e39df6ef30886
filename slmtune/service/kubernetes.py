"""Fine-tuning jobs as Kubernetes Jobs: `slmtune worker --executor kubernetes` (docs/kubernetes.md).

    SLMTUNE_EXECUTOR=kubernetes SLMTUNE_KUBERNETES_IMAGE=registry.example/slmtune:cpu slmtune worker

Each claimed job becomes a batch/v1 Job whose pod runs the same `slmtune train ... --json-events`
the local executor runs, in the slmtune image, with the ReadWriteMany volume of SLMTUNE_HOME mounted
where the worker has it. The trainer appends its events to `events-N.jsonl` in the job's folder on
that volume (`--events-file`), which the worker reads: the events survive the worker and the pod,
and no database credentials go into the trainer's pod.

- Size: `slmtune plan`'s estimate for the recipe (slmtune/training/plan.py) sets the memory request
  and limit, and on GPUs the number of GPUs: more than SLMTUNE_KUBERNETES_GPUS when one GPU is too
  small and the recipe shards (zero3/fsdp); beyond one node's GPUs an Indexed Job with one pod per
  node and a headless Service for torchrun's rendezvous at pod 0.
- Stop (cancel, pause): the Job is deleted; its pod gets SIGTERM, the trainer writes a checkpoint and
  exits within terminationGracePeriodSeconds; the worker waits for the pod to be gone.
- Failures: an evicted, preempted or OOM-killed trainer is retried by the worker from its checkpoint
  (Exit.retry); a trainer that exits with an error fails the job with its message; a pod that stays
  unschedulable or cannot pull its image for SLMTUNE_KUBERNETES_SCHEDULE_TIMEOUT fails the job with
  Kubernetes' reason (`Unschedulable: 0/3 nodes are available: ...`).
- A worker that shuts down leaves its Job running; the next worker to claim the job (after the
  heartbeat timeout) follows the same Job from where the last one stopped reading.
- Jobs carry the tenant and job id as labels and annotations; finished Jobs are deleted by
  Kubernetes after SLMTUNE_KUBERNETES_TTL_SECONDS (ttlSecondsAfterFinished).
"""

from __future__ import annotations

import math
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from slmtune import atomic
from slmtune.config import RecipeError, recipe_from_dict
from slmtune.service.executors import Exit
from slmtune.service.settings import Settings
from slmtune.training import plan as planner
from slmtune.training.rundir import RunDir

LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_JOB = "slmtune.dev/job-id"
LABEL_TENANT = "slmtune.dev/tenant"
LABEL_RUN = "slmtune.dev/trainer"  # this one Kubernetes Job's pods (a job may have several over retries)
ANNOTATION_EVENTS = "slmtune.dev/events-file"
ANNOTATION_TENANT = "slmtune.dev/tenant"
ANNOTATION_JOB = "slmtune.dev/job-id"
ANNOTATION_NUMBER = "slmtune.dev/trainer-number"  # 1, 2, ...: the job's trainers in the order started
TIDY_SECONDS = 30.0  # between sweeps for trainers nobody wants any more
RENDEZVOUS_PORT = 29500
STOP_GRACE_SECONDS = 120  # the trainer's SIGTERM checkpoint must be written within this
POLL_SECONDS = 2.0  # between reads of the Job's status
# Waiting reasons that do not resolve by themselves within seconds: after the schedule timeout the
# job fails with them. (ContainerCreating and the like are normal and not listed.)
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MAX_GPUS = 64
SHM_BYTES = planner.GB  # /dev/shm (memory-backed) counts against the container's memory limit
REQUEST_TIMEOUT = (5, 30)  # seconds to connect, to read: a half-open connection must not hang the worker
# What the API server or the network may answer for a moment (restart, failover): asked again.
TRANSIENT = (HTTPError, OSError)


def transient(err: Exception) -> bool:
    return isinstance(err, TRANSIENT) or (isinstance(err, ApiException) and (err.status in (429, 0) or err.status >= 500))


class SizingError(ValueError):
    pass


@dataclass(frozen=True)
class Sizing:
    """What one job's trainer asks Kubernetes for. GPUs and memory are per pod (one pod per node)."""

    nodes: int
    gpus_per_node: int
    memory_bytes: int
    cpus: int
    estimate_bytes: float  # the planner's peak per device (GPU memory on GPUs, host memory on CPUs)

    @property
    def processes(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)


def _gib(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / planner.GB)) * planner.GB


def size_job(recipe, settings: Settings) -> Sizing:
    """The trainer's resources from `slmtune plan`'s estimate of the recipe: CPU jobs ask for the
    estimate plus a fifth and 1 GiB of room as memory (request = limit: the pod is never squeezed
    by neighbours); GPU jobs ask for enough GPUs of kubernetes_gpu_memory_gb (at 90%) and host
    memory for loading the weights. Unknown architectures get 16 GiB and the configured GPUs."""
    method = recipe.method.name if recipe.method.name in ("full", "lora", "qlora", "dora") else "lora"
    lora_r = getattr(recipe.method, "lora_r", 16)  # methods without a rank are sized as LoRA r=16
    gpus = settings.kubernetes_gpus
    cpus = settings.train_threads or 2
    micro = recipe.train.micro_batch_size
    micro = micro if isinstance(micro, int) else (4 if gpus else 1)  # what "auto" picks (config.py)
    strategy = recipe.train.distributed.strategy
    try:
        arch = planner.architecture(recipe.model.name)
    except (ValueError, OSError, KeyError):
        return Sizing(1, gpus if gpus <= settings.kubernetes_gpus_per_node else settings.kubernetes_gpus_per_node,
                      16 * planner.GB, cpus, 0.0)

    def per_device(devices: int, cpu: bool) -> float:
        # On CPUs fp32 is assumed: the node's CPU (bf16 or not) is not known here, and fp32 is larger.
        return planner.estimate(arch, method, seq_len=recipe.data.max_length, micro_batch=micro, lora_r=lora_r,
                                gradient_checkpointing=recipe.train.gradient_checkpointing, strategy=strategy,
                                devices=devices, cpu=cpu, bf16=not cpu).total

    if gpus == 0:
        need = per_device(1, cpu=True)
        return Sizing(1, 0, _gib(need * 1.2 + planner.GB), cpus, need)
    budget = settings.kubernetes_gpu_memory_gb * planner.GB * 0.9
    sharded = strategy in ("zero3", "fsdp")
    devices = gpus
    if per_device(devices, cpu=False) > budget and (not sharded or per_device(MAX_GPUS, cpu=False) > budget):
        need = per_device(MAX_GPUS if sharded else devices, cpu=False)
        hint = (f"even sharded over {MAX_GPUS} GPUs; train.gradient_checkpointing, a smaller micro_batch_size or "
                "data.max_length lower the activations, which sharding does not divide" if sharded else
                "a sharded strategy (train.distributed.strategy zero3 or fsdp) spreads it over several GPUs")
        raise SizingError(f"the recipe needs about {need / planner.GB:.1f} GB per GPU ({method}, "
                          f"{recipe.model.name}), more than the {settings.kubernetes_gpu_memory_gb:g} GB of one GPU "
                          f"(SLMTUNE_KUBERNETES_GPU_MEMORY_GB) {hint}")
    while per_device(devices, cpu=False) > budget:
        devices += 1
    per_node = settings.kubernetes_gpus_per_node
    nodes = math.ceil(devices / per_node)
    gpus_per_node = math.ceil(devices / nodes)
    # Every process on the node loads the fp32 weights before moving (or sharding) them to its GPU.
    host = gpus_per_node * (arch.total_params() * 4 * 1.2 + 2 * planner.GB) + 2 * planner.GB
    return Sizing(nodes, gpus_per_node, _gib(host), cpus * gpus_per_node, per_device(nodes * gpus_per_node, False))


def trainer_name(job_id: str, n: int) -> str:
    """The Kubernetes Job's name: DNS-1123, short enough for `name-<index>` hostnames."""
    slug = re.sub(r"[^a-z0-9-]+", "-", job_id.lower()).strip("-")[:40]
    return f"slmtune-{slug}-{n}-{secrets.token_hex(2)}"  # never reused: an old Job's pods may linger


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return value.strip("-_.") or "none"


def job_manifest(job, args: list[str], settings: Settings, sizing: Sizing, name: str, events_file: Path,
                 namespace: str) -> dict:
    """The batch/v1 Job that runs `slmtune <args>` for `job` (one pod per node), as a dict."""
    labels = {LABEL_APP: "slmtune", LABEL_COMPONENT: "trainer", LABEL_JOB: _label_value(job.id),
              LABEL_TENANT: _label_value(str(job.tenant_id)), LABEL_RUN: name}
    number = re.search(r"events-(\d+)\.jsonl$", str(events_file))
    annotations = {ANNOTATION_EVENTS: str(events_file), ANNOTATION_TENANT: str(job.tenant_id),
                   ANNOTATION_JOB: job.id, ANNOTATION_NUMBER: number.group(1) if number else "0"}
    args = [*args, "--events-file", str(events_file)]
    env = [{"name": "SLMTUNE_HOME", "value": str(settings.home)}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if sizing.processes > 1:
        args += ["--nproc", str(max(1, sizing.gpus_per_node))]
    if sizing.nodes > 1:
        # $(NODE_RANK) is expanded by Kubernetes from the env below: the pod's completion index.
        env.append({"name": "NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
        args += ["--nnodes", str(sizing.nodes), "--node-rank", "$(NODE_RANK)",
                 "--master-addr", f"{name}-0.{name}", "--master-port", str(RENDEZVOUS_PORT)]
    memory = str(sizing.memory_bytes + SHM_BYTES)
    resources = {"requests": {"cpu": str(sizing.cpus), "memory": memory}, "limits": {"memory": memory}}
    if sizing.gpus_per_node:
        resources["requests"][settings.kubernetes_gpu_resource] = str(sizing.gpus_per_node)
        resources["limits"][settings.kubernetes_gpu_resource] = str(sizing.gpus_per_node)
    volumes = [{"name": "home", "persistentVolumeClaim": {"claimName": settings.kubernetes_home_claim}},
               {"name": "tmp", "emptyDir": {}},
               # torch's shared memory (DataLoader workers, NCCL) outgrows the container runtime's 64 MB /dev/shm
               {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": str(SHM_BYTES)}}]
    pod_spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": STOP_GRACE_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},  # Pod Security "restricted"
        "containers": [{
            "name": "trainer",
            "image": settings.kubernetes_image,
            "args": args,
            "env": env,
            "resources": resources,
            "volumeMounts": [{"name": "home", "mountPath": str(settings.home)}, {"name": "tmp", "mountPath": "/tmp"},
                             {"name": "shm", "mountPath": "/dev/shm"}],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": volumes,
    }
    if settings.kubernetes_node_selector:
        pod_spec["nodeSelector"] = dict(settings.kubernetes_node_selector)
    if settings.kubernetes_tolerations:
        pod_spec["tolerations"] = list(settings.kubernetes_tolerations)
    if settings.kubernetes_service_account:
        pod_spec["serviceAccountName"] = settings.kubernetes_service_account
    if sizing.nodes > 1:
        pod_spec["subdomain"] = name  # pods resolve as <name>-<index>.<name> through the headless Service
    spec = {
        "backoffLimit": 0,  # retries are the worker's: from the checkpoint, after a pause, told to the user
        "ttlSecondsAfterFinished": settings.kubernetes_ttl_seconds,
        "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
    }
    if sizing.nodes > 1:
        spec |= {"completionMode": "Indexed", "completions": sizing.nodes, "parallelism": sizing.nodes}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
            "spec": spec}


def rendezvous_service(name: str, namespace: str, owner_uid: str | None) -> dict:
    """The headless Service giving an Indexed Job's pods their DNS names (torchrun's rendezvous)."""
    metadata = {"name": name, "namespace": namespace, "labels": {LABEL_APP: "slmtune", LABEL_COMPONENT: "trainer"}}
    if owner_uid:  # deleted with its Job
        metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": owner_uid}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata,
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {LABEL_RUN: name},
                     "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}]}}


def _true_conditions(obj) -> dict:
    return {c.type: c for c in ((obj.status and obj.status.conditions) or []) if c.status == "True"}


def pod_failure(pod) -> Exit | None:
    """Why a failed pod failed, in Kubernetes' words; retry=True when the trainer was taken away
    rather than failing by itself (evicted, preempted, OOM-killed)."""
    status = pod.status
    if status is None:
        return None
    if status.reason == "Evicted":
        return Exit(False, f"Evicted: {status.message or 'the node ran short of resources'}", retry=True)
    if status.phase == "Failed" and status.reason and not any(
            cs.state and cs.state.terminated for cs in status.container_statuses or []):
        # refused by the node before the trainer started (UnexpectedAdmissionError, OutOf<resource>)
        return Exit(False, f"{status.reason}: {status.message or 'the node refused the pod'}", retry=True)
    conditions = _true_conditions(pod)
    if "DisruptionTarget" in conditions:
        c = conditions["DisruptionTarget"]
        return Exit(False, f"{c.reason or 'DisruptionTarget'}: {c.message or 'the pod was disrupted'}", retry=True)
    for cs in status.container_statuses or []:
        terminated = cs.state and cs.state.terminated
        if not terminated:
            continue
        if terminated.reason == "OOMKilled":
            limit = ""
            for container in (pod.spec.containers if pod.spec else []) or []:
                if container.name == cs.name and container.resources and container.resources.limits:
                    limit = f" of {container.resources.limits.get('memory')} bytes"
            return Exit(False, f"OOMKilled: the trainer used more than its memory limit{limit}", retry=True)
        if terminated.exit_code not in (0, None):
            return Exit(False, f"the trainer exited with code {terminated.exit_code}"
                               + (f" ({terminated.reason})" if terminated.reason and terminated.reason != "Error" else ""))
    return None


def _number(kjob) -> int:
    try:
        return int((kjob.metadata.annotations or {}).get(ANNOTATION_NUMBER, "0"))
    except ValueError:
        return 0


def _finished_at(pod) -> float:
    ends = [cs.state.terminated.finished_at for cs in (pod.status and pod.status.container_statuses) or []
            if cs.state and cs.state.terminated and cs.state.terminated.finished_at]
    return min(ends).timestamp() if ends else float("inf")


def stuck_reason(pod) -> str | None:
    """Why a pod cannot start (unschedulable, image not pullable), or None."""
    status = pod.status
    if status is None:
        return None
    scheduled = next((c for c in status.conditions or [] if c.type == "PodScheduled"), None)
    if scheduled is not None and scheduled.status == "False" and scheduled.reason == "Unschedulable":
        return f"Unschedulable: {scheduled.message or 'no node can run the trainer'}"
    for cs in status.container_statuses or []:
        waiting = cs.state and cs.state.waiting
        if waiting and waiting.reason in STUCK_REASONS:
            return f"{waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return None


class KubernetesExecution:
    """One Kubernetes Job of a fine-tuning job, followed through the API and its events file."""

    stop_timeout = STOP_GRACE_SECONDS + 30.0

    def __init__(self, executor: "KubernetesExecutor", name: str, events_file: Path):
        self.executor, self.name, self.events_file = executor, name, events_file
        self.offset_file = events_file.with_suffix(".offset")
        try:
            self.offset = int(self.offset_file.read_text())  # a worker followed this Job before
        except (OSError, ValueError):
            self.offset = 0
        self.saved_offset = self.offset
        self.buffer = b""
        self.result: Exit | None = None
        self.stopping = False
        self.stuck_since: float | None = None
        self.next_check = 0.0
        self.api_errors_since: float | None = None

    # --- the events file ------------------------------------------------------------------------
    def _next_line(self) -> bytes | None:
        if b"\n" not in self.buffer:
            try:
                with open(self.events_file, "rb") as f:
                    f.seek(self.offset + len(self.buffer))
                    self.buffer += f.read(1 << 20)
            except FileNotFoundError:  # the pod has not started yet
                return None
        line, sep, rest = self.buffer.partition(b"\n")
        if not sep:
            return None
        self.buffer = rest
        self.offset += len(line) + 1
        return line + b"\n"

    def _save_offset(self) -> None:
        # Where the next worker starts reading if this one goes away (a few lines may be relayed twice).
        if self.offset != self.saved_offset:
            atomic.write_text(self.offset_file, str(self.offset))
            self.saved_offset = self.offset

    def read(self, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line()
            if line is not None:
                return line
            if self.result is not None:
                self._save_offset()
                return None
            now = time.monotonic()
            if now >= self.next_check:
                self.next_check = now + self.executor.poll_seconds
                self._save_offset()
                self._check()
                continue  # the lines written before the trainer ended come first
            if now >= deadline:
                return b""
            time.sleep(min(0.1, deadline - now, self.next_check - now))

    # --- the Job's status -----------------------------------------------------------------------
    def _check(self) -> None:
        try:
            self._check_once()
            self.api_errors_since = None
        except Exception as err:  # noqa: BLE001 - classified: transient errors are asked again
            if not transient(err) and not isinstance(err, ApiException):
                raise
            # The API server is away (or refuses us: RBAC changed): keep asking for a while, then
            # give up on this Job, so the job neither hangs nor fails on a moment's hiccup.
            now = time.monotonic()
            self.api_errors_since = self.api_errors_since or now
            print(f"kubernetes: Job {self.name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                  file=sys.stderr, flush=True)
            if now - self.api_errors_since >= self.executor.settings.kubernetes_schedule_timeout:
                self.executor.delete_job(self.name, quiet=True)
                self.result = Exit(False, f"the Kubernetes API did not answer for {now - self.api_errors_since:.0f} s "
                                          f"({type(err).__name__})", retry=True)

    def _check_once(self) -> None:
        ex = self.executor
        try:
            kjob = ex.batch.read_namespaced_job(self.name, ex.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status != 404:
                raise
            kjob = None
        gone = kjob is None or kjob.metadata.deletion_timestamp is not None
        if self.stopping and not gone:
            ex.delete_job(self.name, quiet=True)
            return
        if gone:
            if ex.pods(self.name):  # its trainer is still writing its SIGTERM checkpoint: wait for it
                return
            self.result = (Exit(False, "stopped") if self.stopping else
                           Exit(False, f"the Kubernetes Job {self.name} was deleted by someone else", retry=True))
            return
        conditions = _true_conditions(kjob)
        if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
            self.result = Exit(True)
        elif "Failed" in conditions:  # (FailureTarget alone: its pods may still be terminating)
            if any(p.status and p.status.phase in ("Pending", "Running") and p.metadata.deletion_timestamp
                   for p in ex.pods(self.name)):
                return
            self.result = self._failure(conditions["Failed"])
        elif not self.stopping:
            self._check_stuck()

    def _failure(self, condition) -> Exit:
        ex = self.executor
        pods = ex.pods(self.name)
        for pod in pods:  # taken away (retry) before failed by itself
            found = pod_failure(pod)
            if found is not None and found.retry:
                return found
        if not pods:  # gone before anyone looked (a lost node's pods are force-deleted): taken away
            return Exit(False, f"{condition.reason or 'Failed'}: {condition.message or 'the trainer pod was lost'}",
                        retry=True)
        for pod in sorted(pods, key=_finished_at):  # the first to end is the cause; siblings are killed after
            found = pod_failure(pod)
            if found is not None:
                tail = ex.log_tail(pod.metadata.name)
                errors = [line[len("error: "):] for line in tail if line.startswith("error: ")]
                detail = errors[-1] if errors else " | ".join(line for line in tail[-3:] if line.strip())
                return Exit(False, (found.error + (f": {detail}" if detail else ""))[:2000])
        return Exit(False, f"{condition.reason or 'Failed'}: {condition.message or 'the Kubernetes Job failed'}")

    def _check_stuck(self) -> None:
        pods = self.executor.pods(self.name)
        reasons = [r for r in (stuck_reason(pod) for pod in pods) if r]
        if not pods:  # the API server refused every pod (ResourceQuota, LimitRange, Pod Security)
            reasons = [f"FailedCreate: no pod was created for the Kubernetes Job {self.name} (see "
                       f"`kubectl describe job {self.name}`: a quota, limit range or Pod Security admission)"]
        if not reasons:
            self.stuck_since = None
            return
        now = time.monotonic()
        self.stuck_since = self.stuck_since or now
        if now - self.stuck_since >= self.executor.settings.kubernetes_schedule_timeout:
            self.executor.delete_job(self.name)
            self.result = Exit(False, f"{reasons[0]} (for {now - self.stuck_since:.0f} s; the Kubernetes Job was "
                                      "deleted)")

    # --- the worker's requests ------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping = True
        self.executor.delete_job(self.name, quiet=True)  # SIGTERM: the trainer checkpoints and exits (re-asked
        # at each check until the Job is gone)

    def kill(self) -> None:
        try:
            self.executor.delete_pods(self.name, grace_seconds=0)
        except (ApiException, *TRANSIENT):
            pass  # the next check asks again

    def leave(self) -> bool:
        self._save_offset()
        return True  # the Job runs on; the next worker to claim the job follows it

    def abandon(self) -> None:
        pass  # the Job and its offset file are the new owner's now

    def exit(self) -> Exit:
        assert self.result is not None, "exit() before read() returned None"
        return self.result


class KubernetesExecutor:
    """Creates, follows and deletes the trainers' Kubernetes Jobs (the official `kubernetes` client;
    in-cluster configuration, else ~/.kube/config or $KUBECONFIG)."""

    def __init__(self, settings: Settings, api_client: k8s.ApiClient | None = None,
                 poll_seconds: float = POLL_SECONDS):
        self.settings = settings
        if api_client is None:
            try:
                k8s_config.load_incluster_config()
            except k8s_config.ConfigException:
                k8s_config.load_kube_config()
            api_client = k8s.ApiClient()
        self.batch = k8s.BatchV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.poll_seconds = poll_seconds
        self.next_tidy = 0.0
        self.namespace = settings.kubernetes_namespace or (
            NAMESPACE_FILE.read_text().strip() if NAMESPACE_FILE.exists() else "default")

    # --- the protocol ---------------------------------------------------------------------------
    def start(self, job, run_dir: RunDir, args: list[str]) -> KubernetesExecution:
        job_dir = run_dir.path.parent
        n = 1 + max([_number(kjob) for kjob in self._trainers(job.id)], default=0)
        while (job_dir / f"events-{n}.jsonl").exists():  # (Jobs deleted meanwhile leave their events files)
            n += 1
        name = trainer_name(job.id, n)
        events_file = job_dir / f"events-{n}.jsonl"
        execution = KubernetesExecution(self, name, events_file)
        try:
            recipe = recipe_from_dict(job.resolved["recipe"], "the job's recipe")
            sizing = size_job(recipe, self.settings)
        except (SizingError, RecipeError) as err:
            execution.result = Exit(False, str(err))
            return execution
        manifest = job_manifest(job, args, self.settings, sizing, name, events_file, self.namespace)
        created = self.batch.create_namespaced_job(self.namespace, manifest, _request_timeout=REQUEST_TIMEOUT)
        if sizing.nodes > 1:
            try:
                self.core.create_namespaced_service(self.namespace,
                                                    rendezvous_service(name, self.namespace, created.metadata.uid),
                                                    _request_timeout=REQUEST_TIMEOUT)
            except Exception:
                self.delete_job(name, quiet=True)  # no orphan: the Job would wait for its rendezvous forever
                raise
        return execution

    def left_behind(self, job) -> KubernetesExecution | None:
        """The job's newest trainer Job, unless it is being deleted: running (its worker shut down or
        died) or ended before its worker recorded the end (the worker died meanwhile). Older Jobs
        were recorded: a newer one exists only after the worker dealt with them."""
        trainers = sorted(self._trainers(job.id), key=_number)
        if not trainers or trainers[-1].metadata.deletion_timestamp:
            return None
        newest = trainers[-1]
        events_file = (newest.metadata.annotations or {}).get(ANNOTATION_EVENTS)
        return KubernetesExecution(self, newest.metadata.name, Path(events_file)) if events_file else None

    def tidy(self, job_status) -> None:
        """Delete running trainer Jobs whose fine-tuning job no longer wants them: a worker that shut
        down left its trainer running for the next one, and the job was cancelled or paused (or
        ended) while queued. `job_status(job_id)` is the store's status (None: no such job)."""
        now = time.monotonic()
        if now < self.next_tidy:
            return
        self.next_tidy = now + TIDY_SECONDS
        try:
            listed = self.batch.list_namespaced_job(
                self.namespace, label_selector=f"{LABEL_APP}=slmtune,{LABEL_COMPONENT}=trainer",
                _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, *TRANSIENT):
            return  # the next sweep
        for kjob in listed.items:
            meta = kjob.metadata
            job_id = (meta.annotations or {}).get(ANNOTATION_JOB)
            if (not job_id or meta.deletion_timestamp or (meta.labels or {}).get(LABEL_COMPONENT) != "trainer"
                    or {"Complete", "Failed", "SuccessCriteriaMet"} & set(_true_conditions(kjob))):
                continue
            if job_status(job_id) in (None, "cancelled", "paused", "failed", "succeeded"):
                self.delete_job(meta.name, quiet=True)  # SIGTERM: a paused job's trainer checkpoints first

    # --- Kubernetes -----------------------------------------------------------------------------
    def _trainers(self, job_id: str) -> list:
        """The Kubernetes Jobs of one fine-tuning job (finished ones too, until their TTL)."""
        label = _label_value(job_id)
        listed = self.batch.list_namespaced_job(self.namespace, label_selector=f"{LABEL_JOB}={label}",
                                                _request_timeout=REQUEST_TIMEOUT)
        return [j for j in listed.items if (j.metadata.labels or {}).get(LABEL_JOB) == label]

    def pods(self, name: str) -> list:
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=f"{LABEL_RUN}={name}",
                                               _request_timeout=REQUEST_TIMEOUT)
        return [p for p in listed.items if (p.metadata.labels or {}).get(LABEL_RUN) == name]

    def log_tail(self, pod_name: str, lines: int = 20) -> list[str]:
        try:
            text = self.core.read_namespaced_pod_log(pod_name, self.namespace, container="trainer", tail_lines=lines,
                                                     _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, *TRANSIENT):
            return []
        return str(text).splitlines()

    def delete_job(self, name: str, quiet: bool = False) -> None:
        """Delete a trainer's Job (its pods get SIGTERM). quiet: on a failure path, where an error
        deleting must not hide the first one."""
        try:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background",
                                             _request_timeout=REQUEST_TIMEOUT)
        except (ApiException, *TRANSIENT) as err:
            if quiet or (isinstance(err, ApiException) and err.status == 404):
                return
            raise

    def delete_pods(self, name: str, grace_seconds: int) -> None:
        for pod in self.pods(name):
            try:
                self.core.delete_namespaced_pod(pod.metadata.name, self.namespace, grace_period_seconds=grace_seconds,
                                                _request_timeout=REQUEST_TIMEOUT)
            except ApiException as err:
                if err.status != 404:
                    raise
