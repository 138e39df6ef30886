"""Task data through validation and training: `data.task` in a recipe, `data validate --task`."""

import json

import pytest

from slmtune.cli import main
from slmtune.config import RecipeError, recipe_from_dict
from slmtune.data.dataset import build_datasets
from slmtune.data.formats import DataError
from slmtune.data.validate import validate_file
from slmtune.models import load_tokenizer
from slmtune.training.run import run
from slmtune.tasks import TASKS
from tests.conftest import write_jsonl
from tests.tasks.shared import shared_rows

GOOD = {
    "classification": {"text": "Call now to win", "label": "spam"},
    "ner": {"tokens": ["Emma", "runs"], "tags": ["B-person", "O"]},
    "translation": {"source": "Hello", "target": "Hallo", "source_lang": "en", "target_lang": "de"},
    "qa": {"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]},
    "creative": {"prompt": "Write a 2-line stanza. Use the rhyme scheme AA.", "completion": "day\nway"},
    "domain": {"text": "PEP 8 -- Style Guide for Python Code"},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "tools": {"tools": [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}}],
              "messages": [{"role": "user", "content": "Ping it"}, {"role": "assistant", "tool_calls": [
                  {"id": "c1", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]}]},
}
# a row missing one required field, the code, and the field the error must name
MISSING = {
    "classification": ({"text": "x"}, "missing_field", "label"),
    "ner": ({"tokens": ["x"]}, "missing_field", "tags"),
    "translation": ({"source": "x"}, "missing_field", "target"),
    "qa": ({"question": "x"}, "missing_field", "answers"),
    "creative": ({"prompt": "x"}, "missing_field", "completion"),
    "domain": ({"txt": "x"}, "missing_field", "text"),
    "chat": ({"messages": []}, "missing_messages", "messages"),  # chat rows keep the chat format's codes
    "tools": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
              "missing_field", "tools"),
}


def recipe(model_dir, train, out, **data):
    return recipe_from_dict({
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(train), "max_length": 512, **data},
        "train": {"max_steps": 2, "micro_batch_size": 4, "precision": "fp32", "learning_rate": 1e-3},
        "output": {"dir": str(out)},
    })


@pytest.mark.parametrize("task", list(TASKS))
def test_validate_task_rows_names_file_line_and_field(tmp_path, task):
    good, (bad, code, field) = GOOD[task], MISSING[task]
    path = write_jsonl(tmp_path / f"{task}.jsonl", [good, good, bad] + [good] * 10)
    report = validate_file(path, task=task)
    assert report.task == task and report.format == TASKS[task].FORMAT
    assert [(i.code, i.line) for i in report.errors] == [(code, 3)]
    assert str(report.errors[0]).startswith(f"{path}:3: error {code}: `{field}`")
    assert validate_file(write_jsonl(tmp_path / "ok.jsonl", [good] * 10), task=task).errors == []


def test_validate_task_with_a_tokenizer_measures_converted_examples(tmp_path, tiny_llama_dir):
    path = write_jsonl(tmp_path / "ner.jsonl", shared_rows("ner", "validation", 12))
    report = validate_file(path, task="ner", tokenizer=load_tokenizer(str(tiny_llama_dir)), max_length=4096)
    assert report.errors == [] and report.n_examples == 12 and report.total_tokens > 12 * 20


def test_cli_validate_task(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ner.jsonl", [GOOD["ner"]] * 10 + [{"tokens": ["a", "b"], "tags": ["O"]}])
    assert main(["data", "validate", str(path), "--task", "ner"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:11: error length_mismatch: 2 tokens but 1 tags" in out and "task ner" in out
    assert main(["data", "validate", str(write_jsonl(tmp_path / "ok.jsonl", [GOOD["ner"]] * 10)), "--task", "ner"]) == 0


def test_recipe_task_field():
    r = recipe("m", "t.jsonl", "o", task="ner", max_examples=5)
    assert r.data.task == "ner" and r.data.max_examples == 5
    assert recipe("m", "t.jsonl", "o").data.task is None
    with pytest.raises(RecipeError, match=r"data.task: Input should be 'classification'"):
        recipe("m", "t.jsonl", "o", task="sentiment")
    with pytest.raises(RecipeError, match="data.task sets the format"):
        recipe("m", "t.jsonl", "o", task="ner", format="chat")


def test_build_datasets_converts_task_rows_and_samples(tmp_path, tiny_tokenizer):
    rows = shared_rows("classification", "validation", 30)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = build_datasets(recipe("m", train, "o", task="classification", max_examples=7).data, tiny_tokenizer, 0)
    assert data.format == "chat" and len(data.train) == 7 and len(data.train_records) == 7
    lines = [r.line for r in data.train_records]
    assert lines == sorted(lines)
    first = data.train_records[0]
    messages = first.data["messages"]
    assert messages[1]["content"].startswith("Classify the text. Answer with exactly one of: ham, spam.")
    assert messages[2]["content"] == rows[first.line - 1]["label"]
    again = build_datasets(recipe("m", train, "o", task="classification", max_examples=7).data, tiny_tokenizer, 0)
    assert [r.line for r in again.train_records] == lines  # seeded


def test_training_refuses_a_row_missing_a_task_field(tmp_path, tiny_llama_dir):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD["classification"], {"text": "no label here"}]
                        + [GOOD["classification"]] * 10)
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.jsonl'}:2: error missing_field: `label` is missing"):
        run(recipe(tiny_llama_dir, train, tmp_path / "run", task="classification"), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("task", ["ner", "classification"])
def test_training_on_task_data_for_a_couple_of_steps(tmp_path, tiny_llama_dir, task):
    train = write_jsonl(tmp_path / "train.jsonl", shared_rows(task, "validation", 16))
    val = write_jsonl(tmp_path / "val.jsonl", shared_rows(task, "test", 4))
    result = run(recipe(tiny_llama_dir, train, tmp_path / "run", task=task, validation=str(val)), progress=False)
    assert result.summary["steps"] == 2 and result.summary["train_examples"] == 16
    assert result.summary["validation_examples"] == 4 and result.summary["eval_loss"] is not None
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert f"task: {task}" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_training_domain_text(tmp_path, tiny_llama_dir):
    rows = [{"text": r["text"][:300]} for r in shared_rows("domain", "validation", 8)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    result = run(recipe(tiny_llama_dir, train, tmp_path / "run", task="domain"), progress=False)
    assert result.summary["steps"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train_examples"] == 8


PARTS = ("NAME", "FORMAT", "FIELDS", "MAX_NEW_TOKENS", "USES_LOSS", "METRIC", "COPIED_FROM", "check", "context",
         "to_example", "parse", "score")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_module_has_the_same_parts(name):
    """tasks/__init__.py's list of parts, in every module; COPIED_FROM (answers copied from a row field,
    which "auto" epochs do not count) names a field the task's good row has."""
    task = TASKS[name]
    assert [part for part in PARTS if not hasattr(task, part)] == []
    assert task.NAME == name and task.COPIED_FROM in (None, *GOOD[name])
