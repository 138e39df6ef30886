"""The service on its llama.cpp backend (SLMTUNE_SERVE_BACKEND=llamacpp): a job trains as always (on the
Hugging Face base), and its fine-tuned model answers through llama.cpp as the run's merged GGUF does,
with the base converted to GGUF once and the job's LoRA converted to a GGUF LoRA on first use."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slmtune.export.gguf import GGUF_FILE, export_gguf
from tests.service.conftest import BASE, start_service, training_rows, wait_for

llama_cpp = pytest.importorskip("llama_cpp", reason='llama.cpp runs need pip install -e ".[gguf]"')

from tests.serve.test_llamacpp_serve import MAX_TOKENS, llamacpp_greedy  # noqa: E402 - after the skip

QUESTION = "What is fact number 3?"


def test_fine_tuned_models_answer_through_llamacpp_as_their_merged_gguf(tmp_path, tiny_llama_dir, upload):
    from slmtune.serve.llamacpp_engine import LlamaCppEngine

    service = start_service(tmp_path / "home", tiny_llama_dir, workers=1, serve_backend="llamacpp",
                            serve_gguf_quant="f32", serve_threads=2)
    try:
        client = service.client("acme")
        training = upload(client, training_rows(12))
        job = client.fine_tuning.jobs.create(model=BASE, training_file=training.id, seed=3, method={
            "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                                                     "learning_rate_multiplier": 10}}})
        job = wait_for(client, job.id)
        assert job.status == "succeeded", job.error
        engine = service.app.state.service.engine
        assert isinstance(engine, LlamaCppEngine) and engine.base_name == BASE
        assert engine.registry.model.n_threads == 2  # SLMTUNE_SERVE_THREADS, not the training's 1
        [base_gguf] = (service.settings.service_dir / "gguf").glob(f"{BASE}-f32-*.gguf")  # converted once

        run_dir = Path(service.app.state.service.store.get_job(job.id).run_dir)
        merged = export_gguf(run_dir, tmp_path / "merged", "f32", llamacpp=False).path / GGUF_FILE
        messages = [{"role": "user", "content": QUESTION}]
        prompt_ids = engine.encode_chat(messages)
        expected = {job.fine_tuned_model: llamacpp_greedy(merged, prompt_ids, engine.eos_ids),
                    BASE: llamacpp_greedy(base_gguf, prompt_ids, engine.eos_ids)}
        assert expected[job.fine_tuned_model] != expected[BASE]  # the adapter changes the answer
        for model in (job.fine_tuned_model, BASE, job.fine_tuned_model):
            reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                   max_tokens=MAX_TOKENS)
            want = [t for t in expected[model] if t not in engine.eos_ids]
            assert reply.choices[0].message.content == engine.decode(want), model
        assert (run_dir.parent / "serve" / "adapter.gguf").is_file()  # converted once, beside the run
        other = service.client("intruder")
        with pytest.raises(Exception) as err:  # another tenant's fine-tuned model stays theirs
            other.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=4)
        assert getattr(err.value, "status_code", None) == 404
    finally:
        service.stop()


def test_an_adapter_llamacpp_cannot_apply_is_a_400_not_a_500(tmp_path, lora_run):
    """A DoRA adapter (magnitude vectors) has no GGUF LoRA form: the request names the reason."""
    import json
    import shutil
    from types import SimpleNamespace

    from slmtune.http.errors import ApiError
    from slmtune.service.engines import served_adapter
    from slmtune.service.settings import Settings

    run_dir = tmp_path / "job" / "run"
    shutil.copytree(lora_run, run_dir)
    config_file = run_dir / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_dora": True}))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    job = SimpleNamespace(run_dir=str(run_dir), base_path=recipe["model"]["name"], fine_tuned_model="ft:dora")
    settings = Settings(home=tmp_path / "home", serve_backend="llamacpp")
    with pytest.raises(ApiError) as err:
        served_adapter(settings, job)
    assert err.value.status == 400 and err.value.code == "model_not_servable" and "DoRA" in err.value.message
    assert not (run_dir.parent / "serve" / "adapter.gguf").exists()  # nothing half-written
    assert served_adapter(Settings(home=tmp_path / "home"), job) == str(run_dir)  # torch: the run folder itself

