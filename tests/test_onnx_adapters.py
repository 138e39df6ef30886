"""`slmtune export --format onnx-base|onnx-adapter` and `serve --backend onnx --adapter`: one ONNX base
with LoRA inputs, adapters as `.onnx_adapter` files over it (tiny Llama from conftest, fp32, CPU).

Two runs share the base: `lora_run` (all-linear, r=4, alpha=8) and a second run adapting only
q_proj/v_proj at another rank (r=2), so an adapter may feed a subset of the base's LoRA inputs at
any rank."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from slmtune.cli import main
from slmtune.export.onnx import ExportError, OnnxCandidate, export_tokenizer
from slmtune.export.parity import PARITY_PROMPTS, greedy_tokens, prompt_ids
from tests.conftest import chat_example, write_jsonl

MAX_NEW = 16


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, tiny_llama_dir):
    """Another LoRA run on the same tiny Llama: q_proj and v_proj only, rank 2, its own data and seed."""
    from slmtune.config import recipe_from_dict
    from slmtune.training.run import run

    root = tmp_path_factory.mktemp("second-run")
    data = write_jsonl(root / "train.jsonl", [chat_example(f"Which colour is item {i}?", f"Item {i} is blue.")
                                              for i in range(16)])
    run(recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)},
        "method": {"name": "lora", "lora_r": 2, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "max_length": 128},
        "train": {"micro_batch_size": 4, "learning_rate": 2e-2, "seed": 11, "precision": "fp32", "max_steps": 2},
        "output": {"dir": str(root / "run")},
    }), progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def shared(tmp_path_factory, lora_run, second_run):
    """The base (from lora_run) and both runs' adapters over it, each parity checked."""
    from slmtune.export.onnx_adapters import export_onnx_adapter, export_onnx_base

    root = tmp_path_factory.mktemp("onnx-lora")
    base = export_onnx_base(lora_run, root / "base", prompts=PARITY_PROMPTS, max_new_tokens=MAX_NEW)
    a = export_onnx_adapter(lora_run, root / "a", base.path, max_new_tokens=MAX_NEW)
    b = export_onnx_adapter(second_run, root / "b", base.path, max_new_tokens=MAX_NEW)
    return SimpleNamespace(root=root, base=base, a=a, b=b, runs={"a": lora_run, "b": second_run})


def answers(report: dict) -> list[list[int]]:
    return [e["exported_tokens"] for e in report["examples"]]


def test_base_export_has_optional_lora_inputs_and_no_fine_tune(shared, lora_run):
    import onnx
    from onnx import numpy_helper

    from slmtune.export.onnx_adapters import SLOTS_FILE

    base = shared.base.path
    info = json.loads((base / SLOTS_FILE).read_text())
    # all-linear on a 2-layer Llama: q, k, v, o, gate, up, down per layer.
    assert len(info["modules"]) == 14 and info["precision"] == "fp32"
    assert sorted(info["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                              "v_proj"]
    graph = onnx.load(str(base / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    initializers = {t.name: t for t in graph.initializer}
    lora = {name: dims for name, dims in inputs.items() if ".lora_" in name}
    assert len(lora) == 28 and set(lora) == set(info["inputs"])
    for name, dims in lora.items():
        rank = dims[1] if ".lora_A." in name else dims[0]
        assert isinstance(rank, str) and rank.startswith("lora_r_"), (name, dims)  # any rank fits
        default = numpy_helper.to_array(initializers[name])  # the default when no adapter is fed: rank 0
        assert 0 in default.shape and default.size == 0
    # The run's own LoRA numbers are not in the base's weights file.
    from safetensors.numpy import load_file

    trained = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    data = (base / "model.onnx.data").read_bytes()
    for name in ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                 "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"):
        assert np.ascontiguousarray(trained[name].T).tobytes()[:64] not in data
    # Without an adapter the base is the plain base model: the same greedy tokens as PyTorch's base.
    report = json.loads((base / "parity.json").read_text())
    assert report["format"] == "onnx-base" and report["token_agreement"] == 1.0
    assert report["next_token_agreement"] == 1.0


def test_adapter_file_holds_exactly_the_runs_A_and_scaled_B(shared, lora_run):
    from safetensors.numpy import load_file

    from slmtune.export.onnx_adapters import ADAPTER_FILE, SLOTS_FILE, read_onnx_adapter

    params = read_onnx_adapter(shared.a.path / ADAPTER_FILE)
    trained = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    scale = np.float32(config["lora_alpha"] / config["r"])
    modules = json.loads((shared.base.path / SLOTS_FILE).read_text())["modules"]
    assert len(params) == 2 * len(modules) == 28
    for module, (entry,) in modules.items():
        a = trained[f"base_model.model.{module}.lora_A.weight"]
        b = trained[f"base_model.model.{module}.lora_B.weight"]
        assert np.array_equal(params[entry["A"]], a.T), module
        assert np.array_equal(params[entry["B"]], (b * scale).T), module
    info = json.loads((shared.a.path / "adapter.json").read_text())
    assert info["ranks"] == {m: 4 for m in modules}


def test_base_plus_adapter_answers_as_the_merged_export_and_pytorch(shared, onnx_export):
    report = shared.a.parity
    assert json.loads((shared.a.path / "parity.json").read_text()) == report
    assert report["format"] == "onnx-adapter" and report["token_agreement"] == 1.0
    assert report["next_token_agreement"] == 1.0
    ours = answers(report)
    assert ours == [e["pytorch_tokens"] for e in report["examples"]]
    # The merged ONNX export of the same run, same prompts, same length: the same tokens.
    merged = OnnxCandidate(onnx_export.export_dir)
    tokenizer = export_tokenizer(onnx_export.export_dir)
    ids = [prompt_ids(tokenizer, p) for p in PARITY_PROMPTS]
    eos = {tokenizer.eos_token_id} | merged.extra_eos_ids
    assert greedy_tokens(merged.decoder, tokenizer, ids, MAX_NEW, eos) == ours
    # ... and not the base model's.
    assert answers(shared.base.parity) != ours


def test_two_adapters_over_one_base_each_answer_as_their_own_run(shared):
    from slmtune.export.onnx_adapters import ADAPTER_FILE, read_onnx_adapter

    b = shared.b.parity
    assert b["token_agreement"] == 1.0 and b["next_token_agreement"] == 1.0
    assert answers(b) != answers(shared.a.parity) and answers(b) != answers(shared.base.parity)
    params = read_onnx_adapter(shared.b.path / ADAPTER_FILE)
    assert len(params) == 2 * 2 * 2  # q and v, A and B, 2 layers: the other inputs keep their zero default
    assert {v.shape[1] for n, v in params.items() if ".lora_A." in n} == {2}  # another rank, same base


def test_a_mismatched_base_or_uncovered_modules_are_refused(shared, lora_run, tmp_path, capsys):
    from slmtune.export.onnx_adapters import SLOTS_FILE, export_onnx_adapter

    # A run trained on another base model.
    other = tmp_path / "other-run"
    shutil.copytree(lora_run, other)
    (tmp_path / "other-model").mkdir()
    recipe = (other / "recipe.yaml").read_text()
    (other / "recipe.yaml").write_text(recipe.replace(json.loads((shared.base.path / SLOTS_FILE).read_text())
                                                      ["base_model"], str(tmp_path / "other-model")))
    with pytest.raises(ExportError, match="was trained on .* but the ONNX base .* was built from"):
        export_onnx_adapter(other, tmp_path / "x", shared.base.path, check_parity=False)
    # A base without LoRA inputs for some of the run's modules (here: a copy that lost its MLP slots).
    narrow = tmp_path / "narrow-base"
    narrow.mkdir()
    shutil.copy(shared.base.path / "genai_config.json", narrow)
    info = json.loads((shared.base.path / SLOTS_FILE).read_text())
    info["modules"] = {m: e for m, e in info["modules"].items() if "self_attn" in m}
    info["target_modules"] = ["k_proj", "o_proj", "q_proj", "v_proj"]
    (narrow / SLOTS_FILE).write_text(json.dumps(info))
    with pytest.raises(ExportError, match="modules the ONNX base .* has no LoRA inputs for .*mlp"):
        export_onnx_adapter(lora_run, tmp_path / "y", narrow, check_parity=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # A merged export is no base; and the CLI's own checks.
    assert main(["export", str(lora_run), "--format", "onnx-adapter", "--output", str(tmp_path / "z")]) == 2
    assert "needs --base-onnx" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--format", "onnx", "--base-onnx", "B", "--output", str(tmp_path / "z")]) == 2
    assert "--base-onnx applies to --format onnx-adapter" in capsys.readouterr().err


def test_serving_selects_adapters_by_name_in_one_batch(shared):
    from slmtune.generation import SamplingParams
    from slmtune.serve.onnx_engine import OnnxEngine

    adapters = {"a": str(shared.a.path), "b": str(shared.b.path / "adapter.onnx_adapter")}  # folder or file
    engine = OnnxEngine.load(str(shared.base.path), adapters, base_name="base", batch_wait_ms=200).start()
    try:
        assert engine.model_names() == ["base", "a", "b"]
        greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW)
        expected = {"base": shared.base.parity, "a": shared.a.parity, "b": shared.b.parity}
        requests = [engine.chat_request(name, [{"role": "user", "content": prompt}], greedy)
                    for prompt in PARITY_PROMPTS[:2] for name in expected]
        engine.submit_all(requests)  # together: one batch mixing the base and both adapters
        for r in requests:
            assert r.done.wait(60) and r.error is None
        for i, r in enumerate(requests):
            assert r.token_ids == answers(expected[r.model])[i // 3], r.model
        stats = engine.stats()
        assert stats["batch_sizes"] == {"6": 1} and sorted(stats["adapters_loaded"]) == ["a", "b"]
    finally:
        engine.stop()


def test_serving_more_adapters_than_loaded_at_once_and_refusals(shared, tmp_path, caplog):
    from slmtune.export.onnx_adapters import write_onnx_adapter
    from slmtune.serve.adapters import AdapterError
    from slmtune.serve.app import create_app
    from slmtune.serve.onnx_engine import OnnxEngine
    from tests.serve.conftest import ServerThread, http_json

    engine = OnnxEngine.load(str(shared.base.path), {"a": str(shared.a.path)}, base_name="base",
                             max_loaded_adapters=1, batch_wait_ms=50)
    server = ServerThread(create_app(engine)).start()
    engine.start()
    try:
        # Registered at run time through the admin API, like the other backends.
        status, body = http_json(server.url + "/admin/adapters", body={"name": "b", "path": str(shared.b.path)})
        assert status == 201, body
        status, body = http_json(server.url + "/v1/models", method="GET")
        assert [m["id"] for m in body["data"]] == ["base", "a", "b"]
        for name, export in (("a", shared.a), ("b", shared.b), ("a", shared.a)):
            status, body = http_json(server.url + "/v1/chat/completions", body={
                "model": name, "temperature": 0, "max_tokens": MAX_NEW,
                "messages": [{"role": "user", "content": PARITY_PROMPTS[0]}]})
            assert status == 200, body
            tokens = answers(export.parity)[0]
            assert body["usage"]["completion_tokens"] == len(tokens)
            assert body["choices"][0]["message"]["content"] == engine.decode([t for t in tokens
                                                                              if t not in engine.eos_ids])
        assert engine.stats()["adapter_evictions"] >= 2 and engine.stats()["adapters_loaded"] == ["a"]
        assert "could not unload" not in caplog.text  # evicted adapters really left onnxruntime-genai
    finally:
        server.stop()
        engine.stop()


    # Files that do not fit the base are refused when registered, with the reason.
    bogus = write_onnx_adapter({"model.layers.0.attn.q_proj.lora_A.MatMul.weight": np.zeros((32, 4), np.float32),
                                "model.layers.0.attn.q_proj.lora_B.MatMul.weight": np.zeros((4, 64), np.float32)},
                               tmp_path / "bogus.onnx_adapter")
    with pytest.raises(AdapterError, match=r"is \[32, 4\], the base takes \[64, 'r'\]"):
        engine.add_adapter("bogus", str(bogus))
    stray = write_onnx_adapter({"lm_head.lora_A.weight": np.zeros((64, 4), np.float32)}, tmp_path / "x.onnx_adapter")
    with pytest.raises(AdapterError, match="no LoRA input for"):
        engine.add_adapter("stray", str(stray))
    with pytest.raises(AdapterError, match="no ONNX adapter there"):
        engine.add_adapter("run", str(shared.runs["a"]))
    elsewhere = tmp_path / "elsewhere"  # an export whose adapter.json names another base model
    shutil.copytree(shared.a.path, elsewhere)
    record = json.loads((elsewhere / "adapter.json").read_text())
    record["base_model"], record["base_identity"] = "/models/other", ["path", "/models/other"]
    (elsewhere / "adapter.json").write_text(json.dumps(record))
    with pytest.raises(AdapterError, match="is an adapter for '/models/other', but this base was built from"):
        engine.add_adapter("elsewhere", str(elsewhere))
    for damaged, reason in (("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                            ('{"base_model": 7}', "expected a JSON object"),
                            ('{"base_model": "/m", "base_identity": 5}', "base identity this server cannot read")):
        (elsewhere / "adapter.json").write_text(damaged)  # a 400 with the reason, not a 500
        with pytest.raises(AdapterError, match=reason):
            engine.add_adapter("damaged", str(elsewhere))
    assert engine.model_names() == ["base", "a", "b"]


def test_cli_serve_backend_onnx_with_adapters(shared, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    assert main(["serve", "--backend", "onnx", "--model", str(shared.base.path), "--adapter", f"a={shared.a.path}",
                 "--adapter", f"b={shared.b.path}", "--max-loaded-adapters", "3"]) == 0
    engine = seen["app"].state.engine
    assert engine.model_names() == [shared.base.path.name, "a", "b"] and engine.registry.max_loaded == 3


def test_phi3_packed_projections_split_over_the_bases_inputs(tmp_path, tiny_tokenizer):
    """Phi-3 trains LoRA on packed qkv_proj / gate_up_proj; the builder splits them into q/k/v and
    gate/up MatMuls (A shared, B's rows split): the adapter file follows, and parity holds (rsLoRA)."""
    from slmtune.config import recipe_from_dict
    from slmtune.export.onnx_adapters import SLOTS_FILE, export_onnx_adapter, export_onnx_base
    from slmtune.training.run import run
    from tests.conftest import build_model

    model = build_model("phi3", len(tiny_tokenizer), tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    model.config.original_max_position_embeddings = model.config.max_position_embeddings  # the 4k (no LongRoPE) kind
    model.save_pretrained(tmp_path / "phi3")
    tiny_tokenizer.save_pretrained(tmp_path / "phi3")
    data = write_jsonl(tmp_path / "train.jsonl", [chat_example(f"What is fact number {i}?", f"Fact {i} is {i}.")
                                                  for i in range(8)])
    run(recipe_from_dict({
        "model": {"name": str(tmp_path / "phi3")},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8, "use_rslora": True},
        "data": {"train": str(data), "max_length": 64},
        "train": {"micro_batch_size": 4, "learning_rate": 5e-3, "seed": 3, "precision": "fp32", "max_steps": 2},
        "output": {"dir": str(tmp_path / "run")},
    }), progress=False)
    base = export_onnx_base(tmp_path / "run", tmp_path / "base", max_new_tokens=MAX_NEW)
    modules = json.loads((base.path / SLOTS_FILE).read_text())["modules"]
    assert [e["rows"] for e in modules["model.layers.0.self_attn.qkv_proj"]] == [[0, 64], [64, 96], [96, 128]]
    assert [e["rows"] for e in modules["model.layers.1.mlp.gate_up_proj"]] == [[0, 128], [128, 256]]
    adapter = export_onnx_adapter(tmp_path / "run", tmp_path / "adapter", base.path, max_new_tokens=MAX_NEW)
    assert base.parity["token_agreement"] == 1.0 and adapter.parity["token_agreement"] == 1.0
    assert adapter.parity["next_token_agreement"] == 1.0 and answers(adapter.parity) != answers(base.parity)


def test_an_adapter_evicted_while_a_generator_holds_it_is_unloaded_once_released(shared):
    """onnxruntime-genai refuses to unload an adapter a Generator holds: the registry keeps it
    pending and unloads it before the next load, once the Generator is gone."""
    from slmtune.export.onnx import onnx_genai
    from slmtune.serve.onnx_engine import OnnxEngine

    engine = OnnxEngine.load(str(shared.base.path), {"a": str(shared.a.path), "b": str(shared.b.path)},
                             base_name="base", max_loaded_adapters=1)
    registry, og = engine.registry, onnx_genai()
    slot = registry._ensure_loaded("a")
    holder = og.Generator(registry.model, og.GeneratorParams(registry.model))
    holder.set_active_adapter(registry.genai, slot)
    registry._ensure_loaded("b")  # evicts a, which holder still uses
    assert registry.pending_unloads == [("a", slot)]
    del holder
    registry._ensure_loaded("a")  # evicts b; before loading a again, the pending unload succeeds
    assert registry.pending_unloads == [] and registry.loaded() == ["a"]


def test_int8_base_opens_the_builders_quantized_lora_nodes_as_float_inputs(lora_run, tmp_path, capsys):
    """At --precision int8 the model builder emits the LoRA MatMuls as MatMulNBits (A and s·B block-
    quantized, `..._Q8`): the base export turns them into float MatMuls on the optional LoRA inputs,
    the base weights stay quantized, and the run's adapter fed to that int8 base gives the run's answers."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    from slmtune.export.onnx import onnx_genai
    from slmtune.export.onnx_adapters import ADAPTER_FILE, LORA_NODE, SLOTS_FILE, lora_model

    base, adapter = tmp_path / "base-int8", tmp_path / "adapter-int8"
    assert main(["export", str(lora_run), "--format", "onnx-base", "--precision", "int8", "--output", str(base)]) == 0
    assert main(["export", str(lora_run), "--format", "onnx-adapter", "--base-onnx", str(base),
                 "--output", str(adapter)]) == 0
    capsys.readouterr()
    info = json.loads((base / SLOTS_FILE).read_text())
    assert info["precision"] == "int8" and len(info["modules"]) == 14

    graph = onnx.load(str(base / "model.onnx"), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    lora_inputs = {i.name for i in graph.input if ".lora_" in i.name}
    assert lora_inputs == set(info["inputs"]) and len(lora_inputs) == 28
    lora_nodes = [n for n in graph.node if LORA_NODE.match(n.name)]
    assert len(lora_nodes) == 28
    for node in lora_nodes:  # plain float MatMuls on the optional inputs: nothing left of MatMulNBits
        match = LORA_NODE.match(node.name)
        module, side = match.group("module"), match.group("side")
        assert node.name == f"/{module}/lora_{side}/MatMul" and node.op_type == "MatMul", node.name
        assert node.domain == "" and not node.attribute and len(node.input) == 2, node.name
        assert node.input[1] == f"{module.replace('/', '.')}.lora_{side}.MatMul.weight", node.name
        # ... while the module's own weight stays 8-bit.
        projection = nodes[f"/{module}/MatMul_Q8"]
        bits = {a.name: helper.get_attribute_value(a) for a in projection.attribute}["bits"]
        assert projection.op_type == "MatMulNBits" and bits == 8, projection.name
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == 15  # the 14 adapted projections and lm_head
    assert not [n.name for n in quantized if "lora" in n.name or lora_inputs & set(n.input)]
    # The builder's quantized LoRA weights (_Q8, _scales) are gone; only the zero-rank defaults remain.
    lora_initializers = {t.name: t for t in graph.initializer if "lora" in t.name}
    assert set(lora_initializers) == lora_inputs
    assert all(numpy_helper.to_array(t).size == 0 for t in lora_initializers.values())

    # Greedy parity: without an adapter against the plain base, with it against the run (teacher-forced,
    # so one int8 near-tie does not compound; measured 0.97 and 0.99 on this model).
    base_report = json.loads((base / "parity.json").read_text())
    adapter_report = json.loads((adapter / "parity.json").read_text())
    assert base_report["format"] == "onnx-base" and adapter_report["format"] == "onnx-adapter"
    assert base_report["next_token_agreement"] >= 0.9 and adapter_report["next_token_agreement"] >= 0.9
    assert answers(base_report) != answers(adapter_report)

    # Logits at each prompt's last position: the adapter's effect in the int8 base is PyTorch's. int8
    # block quantization moves these logits by ~0.005 against an adapter effect of ~0.1: a bound of
    # a fifth of the effect fails if the adapter is lost, doubled or left baked into the base.
    og = onnx_genai()
    model = og.Model(str(base))
    adapters = og.Adapters(model)
    adapters.load(str(adapter / ADAPTER_FILE), "run")
    peft_model, tokenizer, _ = lora_model(lora_run)

    def onnx_logits(ids, with_adapter):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        generator = og.Generator(model, params)
        if with_adapter:
            generator.set_active_adapter(adapters, "run")
        generator.append_tokens(np.array([ids], dtype=np.int32))
        logits = generator.get_logits()
        return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float64)

    for prompt in PARITY_PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            run_logits = peft_model(torch.tensor([ids])).logits[0, -1].double().numpy()
            with peft_model.disable_adapter():
                base_logits = peft_model(torch.tensor([ids])).logits[0, -1].double().numpy()
        vocab = len(run_logits)
        with_adapter, without = onnx_logits(ids, True)[:vocab], onnx_logits(ids, False)[:vocab]
        effect = np.abs(run_logits - base_logits).max()
        assert effect > 0.05, prompt  # the run really moved the base model
        assert np.abs((with_adapter - without) - (run_logits - base_logits)).max() < 0.2 * effect, prompt
        assert np.abs(with_adapter - run_logits).max() < 0.2 * effect, prompt
        assert np.abs(without - base_logits).max() < 0.2 * effect, prompt
