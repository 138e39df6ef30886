"""The Kubernetes executor (slmtune/service/kubernetes.py) against kmock's in-process Kubernetes API.

The API server is kmock's KubernetesEmulator (objects created, read, listed, patched, deleted over
HTTP by the official `kubernetes` client). What a cluster's Job controller and kubelet would do is
done by `Kubelet` below: it creates the Job's pod, and either runs the pod's container command for
real (`slmtune train ...` on the tiny model, with the manifest's args and env) or gives the pod the
status a cluster would report (OOMKilled, Evicted, Unschedulable, exit code 2). The worker is the
service's real Worker with the real store; only where the trainer runs differs from the local tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kmock
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from slmtune.config import recipe_from_dict
from slmtune.service.kubernetes import (LABEL_JOB, LABEL_RUN, SHM_BYTES, STOP_GRACE_SECONDS, KubernetesExecution,
                                        KubernetesExecutor, SizingError, job_manifest, size_job)
from slmtune.service.models import Job
from slmtune.service.settings import Settings
from slmtune.service.store import Store, new_id
from slmtune.service.worker import Worker
from slmtune.training import plan as planner
from tests.kube import kmock_cluster

NS = "fine-tuning"
DEADLINE = 180.0


@pytest.fixture
def cluster():
    with kmock_cluster() as box:
        yield box


def wait_for(condition, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Kubelet:
    """Plays the Job controller and the kubelet for each new Job, one behaviour per Job in order:
    "run" (the pod's command for real), "oom", "evict", "fail" (exit code 2 with an error in the
    log), "unschedulable", "hang" (runs for real, stops when its Job is deleted)."""

    def __init__(self, cluster, behaviours: list[str]):
        self.cluster, self.behaviours = cluster, list(behaviours)
        self.seen: list[dict] = []  # the Job manifests, as created
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        try:
            while not self.stop.is_set():
                for kjob in self.cluster["batch"].list_namespaced_job(NS).items:
                    if kjob.metadata.name not in {m["metadata"]["name"] for m in self.seen}:
                        raw = self.cluster["api"].sanitize_for_serialization(kjob)
                        self.seen.append(raw)
                        behaviour = self.behaviours.pop(0) if self.behaviours else "run"
                        threading.Thread(target=self._guarded, args=(raw, behaviour), daemon=True).start()
                self.stop.wait(0.05)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)

    def _pod(self, job: dict, status: dict) -> str:
        name = f"{job['metadata']['name']}-pod"
        template = job["spec"]["template"]
        self.cluster["core"].create_namespaced_pod(NS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": template["metadata"]["labels"]},
            "spec": template["spec"], "status": status})
        return name

    def _set(self, job: dict, pod: str, pod_status: dict, job_condition: dict):
        self.cluster["core"].patch_namespaced_pod_status(pod, NS, {"status": pod_status})
        self.cluster["batch"].patch_namespaced_job_status(job["metadata"]["name"], NS,
                                                          {"status": {"conditions": [job_condition]}})

    def _exists(self, job: dict) -> bool:
        try:
            self.cluster["batch"].read_namespaced_job(job["metadata"]["name"], NS)
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise

    def _guarded(self, job: dict, behaviour: str):
        try:
            self._run_pod(job, behaviour)
        except BaseException as err:  # noqa: BLE001 - reported by the test (close)
            self.errors.append(err)

    def _run_pod(self, job: dict, behaviour: str):
        failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                  "message": "Job has reached the specified backoff limit"}
        terminated = lambda code, reason: {"phase": "Failed" if code else "Succeeded", "containerStatuses": [  # noqa: E731
            {"name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
             "state": {"terminated": {"exitCode": code, "reason": reason}}}]}
        if behaviour == "nopod":  # the API server refused the pod (quota, Pod Security): nothing happens
            return
        if behaviour == "unschedulable":
            self._pod(job, {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]})
            return
        pod = self._pod(job, {"phase": "Running"})
        if behaviour == "oom":
            self._set(job, pod, terminated(137, "OOMKilled"), failed)
        elif behaviour == "evict":
            self._set(job, pod, {"phase": "Failed", "reason": "Evicted",
                                 "message": "The node was low on resource: memory."}, failed)
        elif behaviour == "fail":
            self.cluster["emulator"][f"get /api/v1/namespaces/{NS}/pods/{pod}/log"] << kmock.text(
                "loading data\nerror: train.jsonl:3: unknown_role: role 'robot' is not one of system/user/assistant\n")
            self._set(job, pod, terminated(2, "Error"), failed)
        else:  # run, hang: the container's command, as the kubelet would start it
            container = job["spec"]["template"]["spec"]["containers"][0]
            env = os.environ | {e["name"]: e["value"] for e in container["env"] if "value" in e}
            proc = subprocess.Popen([sys.executable, "-m", "slmtune.cli", *container["args"]], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while proc.poll() is None:
                if not self._exists(job):  # deleted: the kubelet sends SIGTERM, then removes the pod
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
                    self.cluster["core"].delete_namespaced_pod(pod, NS)
                    return
                time.sleep(0.05)
            stderr = proc.stderr.read().decode(errors="replace")
            assert proc.returncode == 0 or behaviour != "run", stderr[-2000:]
            self._set(job, pod, terminated(proc.returncode, None if proc.returncode == 0 else "Error"),
                      {"type": "Complete", "status": "True"} if proc.returncode == 0 else failed)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.errors, self.errors


@pytest.fixture
def service(tmp_path, cluster, tiny_llama_dir, chat_file):
    settings = Settings(home=tmp_path / "home", workers=0, executor="kubernetes", kubernetes_namespace=NS,
                        kubernetes_image="registry.example/slmtune:cpu", heartbeat_interval=0.1,
                        kubernetes_retry_backoff=0.0, kubernetes_max_retries=2,
                        # Long enough for the emulated kubelet to create a pod on a loaded 2-core CI
                        # machine (at 0.5 s a job once failed as FailedCreate before its pod existed).
                        kubernetes_schedule_timeout=2.0)
    store = Store(settings.db_url)
    store.migrate()
    store.create_key("acme", "0" * 64)
    tenant = store.tenant_for_key("0" * 64)

    def add_job(**train) -> Job:
        job_id = new_id("ftjob", 8)
        run_dir = settings.service_dir / "jobs" / job_id / "run"
        recipe = {"model": {"name": str(tiny_llama_dir)}, "method": {"name": "lora"},
                  "data": {"train": str(chat_file)},
                  "train": {"max_steps": 4, "save_every": 2, "log_every": 1} | train,
                  "output": {"dir": str(run_dir)}}
        job = Job(id=job_id, tenant_id=tenant.id, model="tiny", base_path=str(tiny_llama_dir), training_file="file-t",
                  seed=1, method="lora", hyperparameters={}, resolved={"recipe": recipe, "fine_tuned_model": "ft:tiny"},
                  status="queued", result_files=[], run_dir=str(run_dir), attempts=0, created_at=time.time())
        store.create_job(job, ["queued"])
        return job

    def worker(name: str = "w1") -> Worker:
        return Worker(settings, store, name, KubernetesExecutor(settings, cluster["api"], poll_seconds=0.05))

    return settings, store, add_job, worker


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run_once, daemon=True)
    thread.start()
    return thread


def run_job(worker: Worker, kubelet: Kubelet) -> None:
    """One run_once of the worker, bounded: a broken kubelet or trainer fails the test, never hangs it."""
    thread = run_in_thread(worker)
    deadline = time.monotonic() + DEADLINE
    while thread.is_alive() and time.monotonic() < deadline and not kubelet.errors:
        thread.join(0.1)
    assert not kubelet.errors, kubelet.errors
    assert not thread.is_alive(), "the worker did not finish the job"


def messages(store: Store, job_id: str) -> list[str]:
    return [e.message for e in store.list_events(job_id, None, 1000)[0]]


# --- the Job spec -----------------------------------------------------------------------------------
def test_a_cpu_jobs_spec_runs_the_trainer_on_the_shared_home_sized_by_the_planner(tmp_path):
    settings = Settings(home=tmp_path / "home", kubernetes_image="reg/slmtune:cpu", kubernetes_home_claim="home-rwx",
                        kubernetes_node_selector={"pool": "cpu"}, train_threads=4)
    recipe = recipe_from_dict({"model": {"name": "smollm2-135m-instruct"}, "method": {"name": "lora"},
                               "data": {"train": "t.jsonl", "max_length": 512}, "output": {"dir": "r"}})
    sizing = size_job(recipe, settings)
    need = planner.estimate(planner.architecture("smollm2-135m-instruct"), "lora", seq_len=512, micro_batch=1,
                            cpu=True, bf16=False).total
    assert sizing.nodes == 1 and sizing.gpus_per_node == 0 and sizing.cpus == 4
    assert need * 1.2 + planner.GB <= sizing.memory_bytes < need * 1.2 + 2 * planner.GB
    job = Job(id="ftjob-abc", tenant_id=7)
    events_file = settings.home / "service/jobs/ftjob-abc/events-1.jsonl"
    m = job_manifest(job, ["train", "recipe.yaml", "--json-events", "--no-progress"], settings, sizing,
                     "slmtune-ftjob-abc-1", events_file, NS)
    assert m["kind"] == "Job" and m["metadata"]["labels"][LABEL_JOB] == "ftjob-abc"
    assert m["metadata"]["labels"]["slmtune.dev/tenant"] == "7" and m["metadata"]["namespace"] == NS
    spec = m["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 3600 and "completionMode" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["terminationGracePeriodSeconds"] == STOP_GRACE_SECONDS  # time for the SIGTERM checkpoint
    assert KubernetesExecution.stop_timeout > STOP_GRACE_SECONDS  # the worker waits for it before killing
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    [container] = pod["containers"]
    assert container["image"] == "reg/slmtune:cpu"
    assert container["args"] == ["train", "recipe.yaml", "--json-events", "--no-progress", "--events-file",
                                 str(events_file)]
    assert {"name": "SLMTUNE_HOME", "value": str(settings.home)} in container["env"]
    mounts = {v["name"]: v["mountPath"] for v in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"home": "home-rwx"} and mounts["home"] == str(settings.home)
    assert container["resources"]["limits"] == {"memory": str(sizing.memory_bytes + SHM_BYTES)}  # + /dev/shm
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": str(SHM_BYTES)}
    assert not any("gpu" in k for k in container["resources"]["requests"])


def test_gpu_counts_and_nodes_come_from_the_plan(tmp_path):
    settings = Settings(home=tmp_path / "home", kubernetes_gpus=1, kubernetes_gpu_memory_gb=24,
                        kubernetes_gpus_per_node=4, kubernetes_tolerations=[{"key": "nvidia.com/gpu",
                                                                              "operator": "Exists"}])
    small = recipe_from_dict({"model": {"name": "smollm2-135m-instruct"}, "method": {"name": "lora"},
                              "data": {"train": "t.jsonl"}, "output": {"dir": "r"}})
    assert size_job(small, settings).processes == 1
    big = recipe_from_dict({"model": {"name": "qwen2.5-7b"}, "method": {"name": "full"},
                            "data": {"train": "t.jsonl", "max_length": 2048},
                            "train": {"distributed": {"strategy": "fsdp"}, "micro_batch_size": 2,
                                      "gradient_checkpointing": True},
                            "output": {"dir": "r"}})
    sizing = size_job(big, settings)
    arch, budget = planner.architecture("qwen2.5-7b"), 24 * planner.GB * 0.9

    def per_gpu(n):
        return planner.estimate(arch, "full", seq_len=2048, micro_batch=2, strategy="fsdp", devices=n, cpu=False,
                                bf16=True, gradient_checkpointing=True).total

    fewest = next(n for n in range(1, 65) if per_gpu(n) <= budget)
    assert fewest > 4 and per_gpu(fewest - 1) > budget  # the plan says one node of 4 GPUs is too small
    assert sizing.nodes == -(-fewest // 4) and sizing.nodes * sizing.gpus_per_node >= fewest
    m = job_manifest(Job(id="ftjob-big", tenant_id=1), ["train", "r.yaml"], settings, sizing, "slmtune-ftjob-big-1",
                     Path("/e.jsonl"), NS)
    spec, pod = m["spec"], m["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == sizing.nodes
    assert pod["subdomain"] == "slmtune-ftjob-big-1" and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(sizing.gpus_per_node)
    # each of the node's processes loads the fp32 weights before sharding them
    assert sizing.memory_bytes >= sizing.gpus_per_node * arch.total_params() * 4
    args = container["args"]
    assert args[args.index("--nproc") + 1] == str(sizing.gpus_per_node)
    assert args[args.index("--nnodes") + 1] == str(sizing.nodes) and "$(NODE_RANK)" in args
    assert args[args.index("--master-addr") + 1] == "slmtune-ftjob-big-1-0.slmtune-ftjob-big-1"
    rank = next(e for e in container["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in rank["valueFrom"]["fieldRef"]["fieldPath"]
    unsharded = recipe_from_dict({"model": {"name": "qwen2.5-7b"}, "method": {"name": "full"},
                                  "data": {"train": "t.jsonl"}, "output": {"dir": "r"}})
    with pytest.raises(SizingError, match="zero3 or fsdp"):
        size_job(unsharded, settings)
    activations = recipe_from_dict({"model": {"name": "qwen2.5-7b"}, "method": {"name": "full"},
                                    "data": {"train": "t.jsonl", "max_length": 8192},
                                    "train": {"distributed": {"strategy": "fsdp"}, "micro_batch_size": 8},
                                    "output": {"dir": "r"}})
    with pytest.raises(SizingError, match="gradient_checkpointing"):
        size_job(activations, settings)


# --- the executor and the worker ----------------------------------------------------------------------
def test_a_job_runs_as_a_kubernetes_job_after_an_eviction_and_succeeds(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job()
    kubelet = Kubelet(cluster, ["evict", "run"])
    try:
        run_job(make_worker(), kubelet)
    finally:
        kubelet.close()
    done = store.get_job(job.id)
    assert done.status == "succeeded", (done.error, messages(store, job.id))
    text = messages(store, job.id)
    assert any(m.startswith("Evicted: The node was low on resource") and "retry 1 of 2" in m for m in text)
    assert any(m.startswith("Step 4/4") for m in text)  # events came through the shared events file
    names = [m["metadata"]["name"] for m in kubelet.seen]
    assert len(names) == 2 and names[0] != names[1]
    assert all(m["metadata"]["labels"][LABEL_JOB] == job.id for m in kubelet.seen)
    assert {c.step for c in store.list_checkpoints(job.id, None, 10)[0]} >= {2, 4}


def test_oom_killed_trainers_are_retried_then_the_job_fails_with_kubernetes_reason(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job()
    kubelet = Kubelet(cluster, ["oom", "oom", "oom"])
    try:
        run_job(make_worker(), kubelet)
    finally:
        kubelet.close()
    done = store.get_job(job.id)
    assert done.status == "failed" and done.error["message"].startswith("OOMKilled")
    assert len(kubelet.seen) == 3  # the first try and max_retries=2
    text = messages(store, job.id)
    assert any("retry 2 of 2" in m for m in text) and not any("retry 3" in m for m in text)


def test_a_trainers_own_error_fails_the_job_without_retries(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job()
    kubelet = Kubelet(cluster, ["fail"])
    try:
        run_job(make_worker(), kubelet)
    finally:
        kubelet.close()
    done = store.get_job(job.id)
    assert done.status == "failed" and len(kubelet.seen) == 1
    assert "exited with code 2" in done.error["message"] and "unknown_role" in done.error["message"]


def test_an_unschedulable_trainer_fails_the_job_with_what_kubernetes_said(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job()
    kubelet = Kubelet(cluster, ["unschedulable"])
    try:
        run_job(make_worker(), kubelet)
    finally:
        kubelet.close()
    done = store.get_job(job.id)
    assert done.status == "failed"
    assert done.error["message"].startswith("Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu")
    assert cluster["batch"].list_namespaced_job(NS).items == []  # the stuck Job was deleted


def test_cancel_deletes_the_job_after_its_checkpoint(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job(max_steps=400, save_every=0)
    kubelet = Kubelet(cluster, ["hang"])
    try:
        thread = run_in_thread(make_worker())
        wait_for(lambda: any(m.startswith("Step 1/") for m in messages(store, job.id)), "the first step")
        assert store.set_status(job.id, "cancelled", allowed_from=("running",), message="cancelled by the user")
        thread.join(DEADLINE)
        assert not thread.is_alive()
    finally:
        kubelet.close()
    assert store.get_job(job.id).status == "cancelled"
    assert cluster["batch"].list_namespaced_job(NS).items == []
    assert cluster["core"].list_namespaced_pod(NS).items == []  # the worker waited for the pod to go
    # the trainer wrote its SIGTERM checkpoint before the worker let go of the job
    assert any(m.startswith("Checkpoint created at step") for m in messages(store, job.id))


def test_a_worker_that_shuts_down_leaves_the_job_running_for_the_next(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job(max_steps=12)
    kubelet = Kubelet(cluster, ["run"])
    try:
        first = make_worker("w1")
        thread = run_in_thread(first)
        wait_for(lambda: any(m.startswith("Step 1/") for m in messages(store, job.id)), "the first step")
        first.stopping.set()
        thread.join(DEADLINE)
        assert store.get_job(job.id).status == "queued"  # requeued; its Kubernetes Job runs on
        assert len(cluster["batch"].list_namespaced_job(NS).items) == 1
        # No worker follows it until it has ended: the next one still relays what it missed.
        wait_for(lambda: any(c.type == "Complete" for j in cluster["batch"].list_namespaced_job(NS).items
                             for c in ((j.status and j.status.conditions) or [])), "the trainer to finish")
        run_job(make_worker("w2"), kubelet)
    finally:
        kubelet.close()
    done = store.get_job(job.id)
    assert done.status == "succeeded", (done.error, messages(store, job.id))
    assert len(kubelet.seen) == 1  # the second worker followed the same Kubernetes Job
    assert "Following the trainer another worker started" in messages(store, job.id)
    assert store.get_job(job.id).attempts == 2  # claimed twice, one trainer
    steps = [int(m.split()[1].split("/")[0]) for m in messages(store, job.id) if m.startswith("Step ") and "/" in m]
    assert set(steps) == set(range(1, 13))  # every step reached the store
    assert len(steps) <= 12 + 3  # the second worker read on from where the first stopped (give or take a beat)
    pods = cluster["core"].list_namespaced_pod(NS).items
    assert [p.metadata.labels[LABEL_RUN] for p in pods] == [kubelet.seen[0]["metadata"]["name"]]


def test_a_trainer_whose_pod_is_never_created_fails_the_job(service, cluster):
    settings, store, add_job, make_worker = service
    job = add_job()
    kubelet = Kubelet(cluster, ["nopod"])
    try:
        run_job(make_worker(), kubelet)
    finally:
        kubelet.close()
    done = store.get_job(job.id)
    assert done.status == "failed" and done.error["message"].startswith("FailedCreate: no pod was created")
    assert cluster["batch"].list_namespaced_job(NS).items == []


def test_a_trainer_left_running_for_a_job_paused_meanwhile_is_deleted(service, cluster):
    """A worker shut down and left the trainer to the next; the job was paused while queued: the
    next worker's sweep deletes the trainer (SIGTERM: it checkpoints) instead of letting it train on."""
    settings, store, add_job, make_worker = service
    job = add_job(max_steps=400, save_every=0)
    kubelet = Kubelet(cluster, ["hang"])
    try:
        first = make_worker("w1")
        thread = run_in_thread(first)
        wait_for(lambda: any(m.startswith("Step 1/") for m in messages(store, job.id)), "the first step")
        first.stopping.set()
        thread.join(DEADLINE)
        assert store.get_job(job.id).status == "queued" and len(cluster["batch"].list_namespaced_job(NS).items) == 1
        assert store.set_status(job.id, "paused", allowed_from=("queued",), message="paused by the user")
        assert make_worker("w2").run_once() is False  # nothing to claim, but the sweep ran
        wait_for(lambda: not cluster["core"].list_namespaced_pod(NS).items, "the trainer to stop")
    finally:
        kubelet.close()
    assert cluster["batch"].list_namespaced_job(NS).items == []
    run_dir = Path(job.run_dir)
    assert any((run_dir / "checkpoints").iterdir())  # the SIGTERM checkpoint, for the resume
