"""The fine-tuning service end to end, driven with the official openai client."""

from __future__ import annotations

import shutil
import threading

import openai
import pytest
from safetensors.torch import load_file, save_file

from slmtune.chat import generate_reply
from slmtune.service import engines
from slmtune.service.engines import base_gguf, serves_method
from slmtune.service.settings import Settings
from slmtune.training.rundir import load_for_inference
from tests.conftest import chat_example
from tests.service.conftest import BASE, training_rows, wait_for

HP = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}


def create_job(client, file_id, **kw):
    return client.fine_tuning.jobs.create(
        model=BASE, training_file=file_id, suffix=kw.pop("suffix", "lamp"), seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": kw.pop("hp", HP)}}, **kw)


def full_cycle(service, upload, tenant="acme", validation=False):
    client = service.client(tenant)
    f = upload(client, training_rows(12))
    v = upload(client, training_rows(3), name="val.jsonl") if validation else None
    assert f.purpose == "fine-tune" and f.bytes > 0 and f.filename == "train.jsonl"
    assert client.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.content(f.id).read().count(b"\n") == 12

    job = create_job(client, f.id, metadata={"team": "lamps"}, **({"validation_file": v.id} if v else {}))
    assert job.status == "queued" and job.hyperparameters.n_epochs == 2 and job.metadata == {"team": "lamps"}
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{BASE}:{tenant}:lamp:{job.id}"
    assert job.trained_tokens > 0 and len(job.result_files) == 1
    csv = client.files.content(job.result_files[0]).read().decode()
    assert csv.startswith("step,train_loss") and len(csv.splitlines()) == 7  # header + 6 steps
    if validation:
        assert job.validation_file == v.id and csv.splitlines()[-1].split(",")[2] != ""  # final valid_loss

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert any(m.startswith("Step 6/6: training loss=") for m in messages)
    assert "successfully completed" in messages[0]  # newest first
    page = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    nxt = client.fine_tuning.jobs.list_events(job.id, limit=2, after=page.data[-1].id)
    assert nxt.data[0].id == events[2].id

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    steps = [c.step_number for c in ckpts]
    # One per epoch, newest first (with validation, also one at each new best validation loss).
    assert steps == sorted(steps, reverse=True) and steps[0] == 6 and 3 in steps
    assert validation or steps == [6, 3]
    third = ckpts[steps.index(3)]
    assert third.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-3"
    step_3 = dict(zip(csv.splitlines()[0].split(","), csv.splitlines()[3].split(",")))
    assert step_3["step"] == "3" and third.metrics.train_loss == pytest.approx(float(step_3["train_loss"]), rel=1e-4)

    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    question = [{"role": "user", "content": "What is fact number 3?"}]
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0, messages=question)
    assert reply.model == job.fine_tuned_model
    # The served model is the job's run: the same greedy answer as `slmtune chat <run dir>` gives offline.
    model, tokenizer = load_for_inference(service.app.state.service.store.get_job(job.id).run_dir)
    offline = generate_reply(model, tokenizer, question, max_new_tokens=8)
    assert offline and reply.choices[0].message.content.strip() == offline
    return job


def test_sqlite_full_cycle(sqlite_service, upload):
    job = full_cycle(sqlite_service, upload, validation=True)
    client = sqlite_service.client()
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "acme"
    first = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [job.id]


def test_a_job_whose_validation_loss_rises_serves_its_best_step_and_says_so(sqlite_service, upload):
    """The #22 promise through the service: full fine-tuning at 10x its rate for 50 epochs memorizes
    training answers that the validation file contradicts (same questions, other answers), so the
    validation loss rises (from the first evaluation on). The job's model is the best evaluation's
    weights; its completion message names that step, and the final checkpoint's metrics say which
    step it holds and that it is the best."""
    client = sqlite_service.client()
    train = upload(client, training_rows(12))
    contradicting = [chat_example(f"What is fact number {i}?", f"Fact {i}: the kettle weighs {i + 7} grams.")
                     for i in range(6)]
    val = upload(client, contradicting, name="val.jsonl")
    job = create_job(client, train.id, validation_file=val.id, suffix="rise", extra_body={"slmtune_method": "full"},
                     hp={"n_epochs": 50, "batch_size": 1, "learning_rate_multiplier": 10})
    job = wait_for(client, job.id, timeout=300)
    assert job.status == "succeeded", job.error

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))  # every page, newest first
    valid = {e.data["step"]: e.data["valid_loss"] for e in events
             if e.type == "metrics" and e.data and "valid_loss" in e.data}
    best = min(valid, key=valid.get)
    assert len(valid) >= 3 and valid[600] > valid[best]  # 50 epochs x 12 steps; the loss was made to rise
    assert f"the weights of step {best}, the best validation loss" in events[0].message
    assert [e.data["best_step"] for e in events if e.data and "best_step" in e.data][0] == best  # newest first

    final = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert final.step_number == 600 and final.metrics.final
    assert final.metrics.result_step == best and final.metrics.best
    assert final.metrics.valid_loss == pytest.approx(valid[best], abs=1e-6)
    flagged = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100)
               if c.to_dict()["metrics"].get("best")]
    assert flagged == [600, best]  # the final (which holds the best weights) and the best step's own


def test_step_metrics_csv_gains_openai_reward_columns_for_reinforcement_jobs(tmp_path):
    """step_metrics.csv keeps its four columns for SFT/DPO; steps carrying `reward` (GRPO) add OpenAI's
    train_reward_mean and valid_reward_mean after them."""
    from types import SimpleNamespace

    from slmtune.service.settings import Settings
    from slmtune.service.store import Store
    from slmtune.service.worker import write_result_file
    from slmtune.training import events
    from slmtune.training.rundir import RunDir

    settings = Settings(home=tmp_path / "home", workers=0)
    store = Store(settings.db_url)
    store.migrate()
    store.create_key("t", "0" * 64)
    job = SimpleNamespace(id="ftjob-csv", tenant_id=store.tenant_for_key("0" * 64).id)

    def csv(name, logged):
        run = RunDir(tmp_path / name)
        run.path.mkdir()
        run.metrics_file.write_text("".join(events.to_json(e) + "\n" for e in logged))
        f = store.get_file(job.tenant_id, write_result_file(settings, store, job, run))
        assert f.filename == "step_metrics.csv" and f.purpose == "fine-tune-results"
        return open(f.path).read().splitlines()

    def step(n, loss, **metrics):
        return events.Step(step=n, epoch=n / 2, loss=loss, lr=1e-4, grad_norm=1.0, tokens=10 * n,
                           tokens_per_second=5.0, total_steps=2, metrics=metrics)

    assert csv("sft", [step(1, 2.5), step(2, 2.0), events.Eval(step=2, eval_loss=1.9),
                       events.Best(step=2, metric="eval_loss", value=1.9)]) == [
        "step,train_loss,valid_loss,tokens", "1,2.5,,10", "2,2.0,1.9,20"]
    assert csv("dpo", [step(1, 0.69, **{"rewards/margin": 0.1})])[0] == "step,train_loss,valid_loss,tokens"
    assert csv("grpo", [step(1, 0.1, reward=0.25, reward_std=0.1, **{"reward/exact": 0.5}),
                        step(2, -0.2, reward=0.75, reward_std=0.2),
                        events.Eval(step=2, eval_loss=0.4, metrics={"reward": 0.6, "completion_length": 7.0})]) == [
        "step,train_loss,valid_loss,tokens,train_reward_mean,valid_reward_mean",
        "1,0.1,,10,0.25,", "2,-0.2,0.4,20,0.75,0.6"]


def test_postgres_full_cycle(pg_url, tmp_path, tiny_llama_dir, upload):
    from tests.service.conftest import start_service

    service = start_service(tmp_path / "home", tiny_llama_dir, db=pg_url, workers=1)
    try:
        full_cycle(service, upload)
    finally:
        service.stop()


def long_job(client, upload, n_epochs=10):
    f = upload(client, training_rows(24), name="long.jsonl")
    return create_job(client, f.id, hp={"n_epochs": n_epochs, "batch_size": 1})


def wait_events(client, job_id, predicate, timeout=60):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        if any(predicate(e.message) for e in events):
            return events
        time.sleep(0.2)
    raise AssertionError(f"no such event for {job_id}: {[e.message for e in events][:5]}")


def wait_until(condition, timeout=60):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def trainers_of(job_id: str) -> list[int]:
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and job_id.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_worker_killed_mid_job_resumes_on_another(pg_url, tmp_path, tiny_llama_dir, upload):
    """SIGKILL the worker after its first checkpoint: the job goes back to the queue when the
    heartbeat stops, and the second worker finishes it from that checkpoint."""
    import os
    import signal

    from tests.service.conftest import start_service

    service = start_service(tmp_path / "home", tiny_llama_dir, db=pg_url, workers=0, checkpoint_every=5)
    try:
        client = service.client()
        first = service.start_worker()
        job = long_job(client, upload, n_epochs=4)
        wait_events(client, job.id, lambda m: m.startswith("Checkpoint created"))
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        # the trainer dies with its worker (PR_SET_PDEATHSIG): nothing runs the job now
        wait_until(lambda: not trainers_of(job.id), timeout=30)
        service.start_worker()
        job = wait_for(client, job.id, timeout=150)
        assert job.status == "succeeded", job.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)]  # auto-paginates
        assert any("stopped responding" in m for m in messages)
        assert any(m.startswith("Resuming from checkpoint step-") for m in messages)
        resumed = [m for m in messages if m.startswith("Training resumed at step ")]
        assert resumed and int(resumed[0].split()[4].split("/")[0]) >= 5
        steps = [m for m in messages if m.startswith("Step 96/96")]
        assert len(steps) == 1
    finally:
        service.stop()


def test_cancel_pause_resume(sqlite_service, upload):
    client = sqlite_service.client("pauser")
    job = long_job(client, upload)
    wait_events(client, job.id, lambda m: m.startswith("Step "))
    paused = client.post(f"/fine_tuning/jobs/{job.id}/pause", cast_to=object)
    assert paused["status"] == "paused"
    wait_events(client, job.id, lambda m: m.startswith("Checkpoint created"))  # SIGTERM -> checkpoint
    resumed = client.post(f"/fine_tuning/jobs/{job.id}/resume", cast_to=object)
    assert resumed["status"] == "queued"
    wait_events(client, job.id, lambda m: m.startswith("Training resumed at step"))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    # The worker notices at its next heartbeat, SIGTERMs the trainer, waits for it to exit and lets
    # the job go: from then on nothing can add events.
    store = sqlite_service.app.state.service.store
    wait_until(lambda: store.get_job(job.id).worker_id is None and not trainers_of(job.id))
    n = len(client.fine_tuning.jobs.list_events(job.id, limit=100).data)
    assert len(client.fine_tuning.jobs.list_events(job.id, limit=100).data) == n
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.cancel(job.id)
    assert err.value.body["code"] == "invalid_job_state"


def bad_request(call, status=400):
    with pytest.raises(openai.APIStatusError) as err:
        call()
    assert err.value.status_code == status, err.value
    return err.value.body  # the "error" object: message, type, param, code


def raw_upload(service, content: bytes, filename="train.jsonl", purpose="fine-tune", tenant="acme"):
    import httpx2 as httpx

    return httpx.post(service.url + "/v1/files", headers={"Authorization": f"Bearer {service.key(tenant)}"},
                      files={"file": (filename, content)}, data={"purpose": purpose}, timeout=30)


def test_bad_uploads_are_clear_4xx_and_store_nothing(sqlite_service, upload):
    import json

    client = sqlite_service.client("uploader")
    good = "".join(json.dumps(r) + "\n" for r in training_rows(12)).encode()
    cases = {
        "invalid_encoding": good.replace(b"fact number 1?", b"fact \xff\xfe 1?", 1),
        "invalid_file_format": good + b"{not json\n",
        "empty_file": b"",
    }
    for code, content in cases.items():
        r = raw_upload(sqlite_service, content)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    r = raw_upload(sqlite_service, good + b"{not json\n")
    assert "line 13: invalid_json" in r.json()["error"]["message"]
    r = raw_upload(sqlite_service, good.replace(b"fact \xff", b"x") + b'{"messages": []}\n')
    assert "line 13: missing_messages" in r.json()["error"]["message"]
    r = raw_upload(sqlite_service, good.replace(b"What is fact number 1?", b"\xc3\x28"))
    assert r.json()["error"]["code"] == "invalid_encoding" and "line 2" in r.json()["error"]["message"]
    for name in ("../evil.jsonl", "dir/train.jsonl", "a\\b.jsonl"):
        r = raw_upload(sqlite_service, good, filename=name)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_filename", (name, r.text)
    r = raw_upload(sqlite_service, good, purpose="assistants")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = raw_upload(sqlite_service, good * 40)  # > the 20000-byte limit of this server
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert client.files.list().data == []
    files_dir = sqlite_service.settings.service_dir / "files"
    assert not [p for p in files_dir.iterdir() if p.name.startswith(".")]


def test_bad_jobs_are_clear_4xx(sqlite_service, upload):
    client = sqlite_service.client("jobber")
    f = upload(client, training_rows(12))
    few = upload(client, training_rows(5), name="few.jsonl")
    other = upload(sqlite_service.client("outsider"), training_rows(12))

    def create(**kw):
        args = {"model": BASE, "training_file": f.id} | kw
        return lambda: client.fine_tuning.jobs.create(**args)

    def hp(**values):
        return {"method": {"type": "supervised", "supervised": {"hyperparameters": values}}}

    expect = [
        (create(model="gpt-4o-mini"), "model_not_available", "model"),
        (create(training_file="file-doesnotexist"), "file_not_found", "training_file"),
        (create(training_file=other.id), "file_not_found", "training_file"),
        (create(validation_file=other.id), "file_not_found", "validation_file"),
        (create(training_file=few.id), "invalid_n_examples", "training_file"),
        (create(**hp(n_epochs="many")), "invalid_hyperparameters", "method.supervised.hyperparameters.n_epochs"),
        (create(**hp(n_epochs=2.5)), "invalid_hyperparameters", "method.supervised.hyperparameters.n_epochs"),
        (create(**hp(batch_size=0)), "invalid_hyperparameters", "method.supervised.hyperparameters.batch_size"),
        (create(**hp(learning_rate_multiplier=-1)), "invalid_hyperparameters",
         "method.supervised.hyperparameters.learning_rate_multiplier"),
        (create(**hp(warmup=3)), "invalid_hyperparameters", "method.supervised.hyperparameters.warmup"),
        (create(suffix="has spaces!"), "invalid_suffix", "suffix"),
        (create(method={"type": "magic"}), "invalid_value", "method.type"),
        (create(method={"type": "dpo"}), "invalid_file_format", "training_file"),  # a chat file, not pairs
        (create(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}), "invalid_file_format",
         "training_file"),
        (create(method={"type": "supervised", "dpo": {"hyperparameters": {}}}), "invalid_value", "method"),
        (create(extra_body={"slmtune_method": "magic"}), "invalid_value", "slmtune_method"),
        (create(extra_body={"bogus": 1}), "unknown_parameter", "bogus"),
    ]
    for call, code, param in expect:
        body = bad_request(call)
        assert (body["code"], body["param"]) == (code, param), body
        assert body["message"]
    import httpx2 as httpx

    headers = {"Authorization": f"Bearer {sqlite_service.key('jobber')}", "Content-Type": "application/json"}
    for raw, code in [(b"{not json", "invalid_json"), (b'{"model": "tiny"}', "missing_required_parameter"),
                      (b'{"model": "tiny", "training_file": "x", "metadata": {"a": 1}}', "invalid_value")]:
        r = httpx.post(sqlite_service.url + "/v1/fine_tuning/jobs", content=raw, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert client.fine_tuning.jobs.list().data == []
    few_body = bad_request(create(training_file=few.id))
    assert "5 example(s)" in few_body["message"] and "at least 10" in few_body["message"]
    bad_request(lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"), 404)
    bad_request(lambda: client.fine_tuning.jobs.list_events("ftjob-nope"), 404)
    bad_request(lambda: client.files.retrieve("file-nope"), 404)
    bad_request(lambda: client.files.delete("file-nope"), 404)
    bad_request(lambda: client.chat.completions.create(model="ft:nope", messages=[{"role": "user", "content": "x"}]),
                404)
    assert client.files.delete(few.id).deleted
    bad_request(lambda: client.files.retrieve(few.id), 404)


def test_auth_required(sqlite_service):
    import httpx2 as httpx
    from openai import OpenAI

    for key in ("wrong", "sk-slm-notakey"):
        bad = OpenAI(base_url=sqlite_service.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.files.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        r = httpx.get(sqlite_service.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # the base model itself is served to any tenant
    reply = sqlite_service.client("anyone").chat.completions.create(
        model=BASE, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_tenant_isolation(sqlite_service, upload):
    owner = sqlite_service.client("acme")
    other = sqlite_service.client("rival")
    jobs = [j for j in owner.fine_tuning.jobs.list() if j.status == "succeeded"]
    if not jobs:
        jobs = [full_cycle(sqlite_service, upload)]
    job = jobs[0]
    f = job.training_file
    assert other.files.list().data == [] or f not in [x.id for x in other.files.list()]
    bad_request(lambda: other.files.retrieve(f), 404)
    bad_request(lambda: other.files.content(f), 404)
    bad_request(lambda: other.files.delete(f), 404)
    bad_request(lambda: other.fine_tuning.jobs.retrieve(job.id), 404)
    bad_request(lambda: other.fine_tuning.jobs.cancel(job.id), 404)
    bad_request(lambda: other.fine_tuning.jobs.list_events(job.id), 404)
    bad_request(lambda: other.fine_tuning.jobs.checkpoints.list(job.id), 404)
    bad_request(lambda: other.models.retrieve(job.fine_tuned_model), 404)
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    assert job.fine_tuned_model not in [m.id for m in other.models.list()]
    body = bad_request(lambda: other.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]), 404)
    assert body["code"] == "model_not_found"
    body = bad_request(lambda: other.fine_tuning.jobs.create(model=BASE, training_file=f))
    assert body["code"] == "file_not_found"
    assert owner.files.retrieve(f).id == f  # still there for its owner


def test_keys_cli(sqlite_service, tmp_path):
    import subprocess
    import sys

    db = sqlite_service.settings.db_url
    out = subprocess.run([sys.executable, "-m", "slmtune.cli", "keys", "create", "--tenant", "cli-team", "--db", db],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("sk-slm-")
    from openai import OpenAI

    client = OpenAI(base_url=sqlite_service.url + "/v1", api_key=key, max_retries=0)
    assert client.files.list().data == []
    from sqlalchemy import create_engine, text

    with create_engine(db).connect() as conn:
        hashes = [r[0] for r in conn.execute(text("SELECT key_hash FROM slm_api_keys"))]
    assert key not in hashes and len(hashes[0]) == 64
    bad = subprocess.run([sys.executable, "-m", "slmtune.cli", "keys", "create", "--tenant", "Bad Name!", "--db", db],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "tenant" in bad.stderr


def test_training_error_fails_the_job_with_its_message(sqlite_service, upload):
    """Data that passes the upload checks but that training refuses: a failed job, the trainer's error."""
    client = sqlite_service.client("failer")
    rows = training_rows(12)
    for row in rows:
        row["messages"][-1]["weight"] = 0  # nothing left to learn from
    f = upload(client, rows)
    job = wait_for(client, create_job(client, f.id).id)
    assert job.status == "failed"
    assert job.error.code == "training_failed" and job.error.message
    assert "Traceback" not in job.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert messages[0].startswith("Job failed: ")
    print(job.error.message)


def test_api_command(tmp_path, tiny_llama_dir):
    """`slmtune api` as users run it: embedded SQLite under $SLMTUNE_HOME, migrations at startup."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.serve.conftest import free_port

    port = free_port()
    env = os.environ | {"SLMTUNE_HOME": str(tmp_path / "home")}
    server = subprocess.Popen([sys.executable, "-m", "slmtune.cli", "api", "--port", str(port), "--workers", "0",
                               "--models", f"{BASE}={tiny_llama_dir}", "--log-level", "warning"], env=env,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "slmtune api did not start"
                time.sleep(0.3)
        out = subprocess.run([sys.executable, "-m", "slmtune.cli", "keys", "create", "--tenant", "t1"], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=out.stdout.splitlines()[-1], max_retries=0)
        assert [m.id for m in client.models.list()] == [BASE]
        assert (tmp_path / "home" / "service" / "service.db").exists()
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("backend, method, served", [
    ("torch", "lora", True), ("torch", "dora", True), ("torch", "full", False),
    ("llamacpp", "lora", True), ("llamacpp", "qlora", True), ("llamacpp", "dora", False), ("llamacpp", "full", False)])
def test_models_list_says_served_only_for_what_the_backend_can_answer(tmp_path, backend, method, served):
    assert serves_method(Settings(home=tmp_path / "home", serve_backend=backend), method) is served


def test_the_llamacpp_base_is_converted_once_per_weights(tmp_path, tiny_llama_dir):
    """The served GGUF base is converted once, and again when the name points at other weights
    (a stale conversion would serve weights the adapters were not trained on)."""
    settings = Settings(home=tmp_path / "home", serve_backend="llamacpp", serve_gguf_quant="f32")
    model = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, model)
    first = base_gguf(settings, "base", str(model))
    converted_at = first.stat().st_mtime_ns
    assert base_gguf(settings, "base", str(model)) == first and first.stat().st_mtime_ns == converted_at
    weights = load_file(model / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    first_bytes = first.read_bytes()
    second = base_gguf(settings, "base", str(model))
    assert second != first and second.read_bytes() != first_bytes
    assert not first.exists()  # the stale conversion is deleted, not left to fill the disk


def test_replicas_starting_together_convert_the_llamacpp_base_once(tmp_path, tiny_llama_dir, monkeypatch):
    """Converting loads the base in float32: API replicas sharing the service folder take turns, and
    the ones that waited serve the file the first one wrote."""
    settings = Settings(home=tmp_path / "home", serve_backend="llamacpp", serve_gguf_quant="f32")
    conversions = []
    real_write = engines.write_gguf

    def counted(*args, **kwargs):
        conversions.append(threading.get_ident())
        return real_write(*args, **kwargs)

    monkeypatch.setattr(engines, "write_gguf", counted)
    paths = []
    replicas = [threading.Thread(target=lambda: paths.append(base_gguf(settings, "base", str(tiny_llama_dir))))
                for _ in range(3)]
    for replica in replicas:
        replica.start()
    for replica in replicas:
        replica.join(120)
    assert len(conversions) == 1 and len(set(paths)) == 1 and len(paths) == 3 and paths[0].is_file()
