"""`slmtune eval` end to end on the tiny in-process model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slmtune.cli import main
from slmtune.config import recipe_from_dict
from slmtune.data.tokenize import IGNORE, encode
from slmtune.evaluate import evaluate, format_table
from slmtune.scoring import generate_batched, metric_interval, states_fact
from slmtune.models import load_model, load_tokenizer
from slmtune.training.run import run
from tests.conftest import write_jsonl
from tests.tasks.shared import shared_rows


@pytest.fixture(scope="module")
def classification_run(tiny_llama_dir, tmp_path_factory):
    """A two-step LoRA run on classification task data; its recipe has data.task."""
    root = tmp_path_factory.mktemp("cls-run")
    train = write_jsonl(root / "train.jsonl", shared_rows("classification", "train", 24))
    recipe = recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(train), "task": "classification", "max_length": 512},
        "train": {"max_steps": 2, "micro_batch_size": 4, "precision": "fp32"},
        "output": {"dir": str(root / "run")},
    })
    run(recipe, progress=False)
    return root / "run"


def test_eval_run_dir_writes_eval_json_with_the_runs_task(classification_run, tmp_path, capsys):
    test = write_jsonl(tmp_path / "test.jsonl", shared_rows("classification", "test", 20))
    code = main(["eval", str(classification_run), "--data", str(test), "--limit", "6", "--batch-size", "4",
                 "--max-new-tokens", "4"])
    assert code == 0
    report = json.loads((classification_run / "eval.json").read_text())
    assert report["task"] == "classification" and report["n_examples"] == 6 and report["max_new_tokens"] == 4
    assert set(report["metrics"]) >= {"accuracy", "macro_f1", "per_class"}
    right = sum(e["prediction"] == e["reference"] for e in report["examples"])
    assert report["metrics"]["accuracy"] == pytest.approx(right / 6)  # of the answers it reports
    first = report["examples"][0]
    assert first["line"] == 1 and first["reference"] == shared_rows("classification", "test", 1)[0]["label"]
    # the prompt is the training prompt: the label set comes from the run's training file
    assert "Answer with exactly one of: ham, spam." in first["prompt"]
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "macro_f1" in captured.out
    assert "eval classification" in captured.err  # the tqdm bar
    assert f"wrote {classification_run / 'eval.json'}" in captured.err


def test_batched_generation_equals_one_at_a_time(tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir)).eval()
    prompts = [[{"role": "user", "content": "Hi" + " there" * n}] for n in (0, 7, 2, 12, 1)]
    eos = [tiny_tokenizer.eos_token_id]
    one = generate_batched(model, tiny_tokenizer, prompts, batch_size=1, max_new_tokens=10, eos_ids=eos)
    batched = generate_batched(model, tiny_tokenizer, prompts, batch_size=3, max_new_tokens=10, eos_ids=eos)
    assert one == batched and any(one)


def test_generation_computes_logits_for_the_last_position_only(tiny_llama_dir, tiny_tokenizer):
    model = load_model(str(tiny_llama_dir)).eval()
    widths = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))
    prompts = [[{"role": "user", "content": "a long prompt " * 5}], [{"role": "user", "content": "short"}]]
    generate_batched(model, tiny_tokenizer, prompts, batch_size=2, max_new_tokens=4, eos_ids=[-1])
    assert widths == [1, 1, 1, 1]  # prefill + 3 cached steps, never prompt-length logits


def test_eval_model_with_output_and_task_from_rows(tiny_llama_dir, tmp_path):
    rows = shared_rows("ner", "validation", 5)
    data = write_jsonl(tmp_path / "ner.jsonl", rows)
    out = tmp_path / "reports" / "ner.json"
    result = evaluate(str(tiny_llama_dir), str(data), batch_size=2, max_new_tokens=6, output=out, progress=False)
    assert result.path == out and json.loads(out.read_text())["task"] == "ner"
    assert set(result.report["metrics"]) >= {"precision", "recall", "f1"}
    assert len(result.report["examples"]) == 5
    # no run dir and no --output: nothing written
    assert evaluate(str(tiny_llama_dir), str(data), limit=1, max_new_tokens=2, progress=False).path is None


def _manual_loss(model, tokenizer, examples):
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.input_ids])
            targets = torch.tensor(example.targets)
            logits = model(input_ids=ids).logits[0]
            keep = targets != IGNORE
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def test_domain_perplexity_is_the_target_loss(tiny_llama_dir, tmp_path):
    rows = [{"text": r["text"][:200]} for r in shared_rows("domain", "validation", 5)]
    data = write_jsonl(tmp_path / "domain.jsonl", rows)
    result = evaluate(str(tiny_llama_dir), str(data), task="domain", batch_size=2, output=tmp_path / "e.json",
                      progress=False)
    metrics = result.report["metrics"]
    assert result.report["max_new_tokens"] == 0 and result.report["examples"] == []
    tokenizer, model = load_tokenizer(str(tiny_llama_dir)), load_model(str(tiny_llama_dir)).eval()
    expected = _manual_loss(model, tokenizer, [encode("text", r, tokenizer, 1024) for r in rows])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)


def test_chat_eval_reports_loss_and_rouge(tiny_llama_dir, tmp_path):
    rows = shared_rows("chat", "validation", 4)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    metrics = evaluate(str(tiny_llama_dir), str(data), batch_size=2, max_new_tokens=5, progress=False).report["metrics"]
    assert {"loss", "perplexity", "rouge_l"} <= set(metrics) and metrics["loss"] > 0
    tokenizer, model = load_tokenizer(str(tiny_llama_dir)), load_model(str(tiny_llama_dir)).eval()
    expected = _manual_loss(model, tokenizer, [encode("chat", r, tokenizer, 1024) for r in rows])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    loss_only = evaluate(str(tiny_llama_dir), str(data), max_new_tokens=0, progress=False).report["metrics"]
    assert "rouge_l" not in loss_only and loss_only["loss"] == pytest.approx(metrics["loss"])


def test_eval_bad_rows_and_unknown_task_are_clear_errors(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answers": ["a"]}, {"question": "q"}])
    assert main(["eval", str(tiny_llama_dir), "--data", str(data), "--task", "qa", "--no-progress"]) == 2
    assert f"{data}:2: error missing_field: `answers` is missing" in capsys.readouterr().err
    odd = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    assert main(["eval", str(tiny_llama_dir), "--data", str(odd), "--no-progress"]) == 2
    assert "give --task" in capsys.readouterr().err


def test_tools_eval_offers_the_tools_and_scores_calls(tiny_llama_dir, tmp_path, monkeypatch):
    from slmtune import scoring
    from tests.service.test_tools_service import ping_row

    data = write_jsonl(tmp_path / "tools.jsonl", [ping_row(i) for i in range(3)])
    offered = []
    real = scoring.chat_prompt_ids
    monkeypatch.setattr(scoring, "chat_prompt_ids", lambda tok, messages, tools=None: offered.append(tools)
                        or real(tok, messages, tools))
    report = evaluate(str(tiny_llama_dir), str(data), batch_size=2, max_new_tokens=4, progress=False).report
    assert report["task"] == "tools" and offered == [[ping_row(0)["tools"][0]]] * 3
    metrics = report["metrics"]
    assert metrics["n"] == 3 and metrics["n_with_calls"] == 3 and metrics["missed_call_rate"] == 1.0  # 4 random tokens
    assert json.loads(report["examples"][0]["reference"]) == [ping_row(0)["messages"][-1]["tool_calls"][0]["function"]]


@pytest.mark.parametrize("answer, expected, right", [
    ("The battery lasts 70 KM on a charge.", ["70 km"], True),
    ("It is the E07 fault.", ["E05", "E07"], True),
    ("DONE", ["E07"], False),
    ("", ["anything"], False),
])
def test_a_held_out_answer_states_its_fact_case_insensitively(answer, expected, right):
    assert states_fact(answer, expected) is right


def test_metric_interval_is_a_seeded_bootstrap_of_the_rows():
    accuracy = lambda predictions, rows: sum(p == r for p, r in zip(predictions, rows)) / len(rows)  # noqa: E731
    rows = ["a"] * 100
    predictions = ["a"] * 90 + ["b"] * 10
    interval = metric_interval(accuracy, predictions, rows)
    assert interval == metric_interval(accuracy, predictions, rows)  # seeded: a report is reproducible
    assert interval["resamples"] == 1000 and interval["level"] == 0.95
    # 90 of 100: the binomial's normal interval is 0.90 +- 1.96 * 0.03 = 0.841 - 0.959.
    assert interval["low"] == pytest.approx(0.841, abs=0.015) and interval["high"] == pytest.approx(0.959, abs=0.015)
    # Ten times the rows: about a third of the width.
    wide = interval["high"] - interval["low"]
    narrow = metric_interval(accuracy, predictions * 10, rows * 10)
    assert (narrow["high"] - narrow["low"]) == pytest.approx(wide / math.sqrt(10), rel=0.2)
    # All right: nothing to resample away. Too few rows, or a metric that is not a number: no interval.
    assert metric_interval(accuracy, rows, rows)["low"] == 1.0
    assert metric_interval(accuracy, ["a"], ["a"]) is None
    assert metric_interval(lambda p, r: None, predictions, rows) is None
    # A metric too slow for the time limit gives no interval rather than a rough one.
    assert metric_interval(accuracy, predictions, rows, seconds=0.0) is None


def test_eval_reports_the_headline_metrics_interval(classification_run, tmp_path, capsys):
    test = write_jsonl(tmp_path / "test.jsonl", shared_rows("classification", "test", 20))
    report = evaluate(str(classification_run), str(test), limit=12, max_new_tokens=4, output=tmp_path / "e.json",
                      progress=False).report
    interval = report["interval"]
    assert interval["metric"] == "macro_f1" and interval["method"] == "bootstrap"
    assert 0.0 <= interval["low"] <= interval["high"] <= 1.0
    assert json.loads((tmp_path / "e.json").read_text())["interval"] == interval
    assert "macro_f1 95% interval:" in format_table(report)
    # Nothing generated (perplexity from losses alone): no interval.
    rows = [{"text": r["text"][:200]} for r in shared_rows("domain", "validation", 3)]
    domain = evaluate(str(classification_run), str(write_jsonl(tmp_path / "d.jsonl", rows)), task="domain",
                      output=tmp_path / "d.json", progress=False).report
    assert domain["interval"] is None
