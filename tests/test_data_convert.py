"""`slmtune data convert` from Alpaca, ShareGPT, CSV and a `datasets` save_to_disk folder."""

import json
import subprocess
import sys

import pytest

from slmtune.cli import main
from slmtune.data.convert import convert
from slmtune.data.formats import DataError
from slmtune.data.validate import validate_file


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_alpaca_jsonl_and_json_array(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."}]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = convert("alpaca", jsonl, tmp_path / "out.jsonl")
    assert out.n_rows == 2 and out.format == "chat"
    assert read(out.path) == [
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi!"}]},
    ]
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps(rows, indent=2))  # the original Alpaca release is one JSON array
    assert main(["data", "convert", "--from", "alpaca", str(array), str(tmp_path / "b.jsonl")]) == 0
    assert read(tmp_path / "b.jsonl") == read(out.path)


def test_alpaca_problems_name_file_and_line(tmp_path):
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}], indent=1))
    with pytest.raises(DataError) as err:
        convert("alpaca", array, tmp_path / "out.jsonl")
    # the second element starts on line 6 of the pretty-printed array
    assert f"{array}:6: error missing_field: `output` is missing, not a string, or empty" in str(err.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_sharegpt(tmp_path):
    src = tmp_path / "sharegpt.jsonl"
    src.write_text(json.dumps({"conversations": [
        {"from": "system", "value": "You are kind."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]})
        + "\n" + json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{src}:2: error unknown_role: conversations\[1\].from is 'robot'"):
        convert("sharegpt", src, tmp_path / "out.jsonl")
    src.write_text(src.read_text().splitlines()[0] + "\n")
    out = convert("sharegpt", src, tmp_path / "out.jsonl")
    assert [m["role"] for m in read(out.path)[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert read(out.path)[0]["messages"][2]["content"] == "Hello!"


def test_csv_to_task_format_with_column_mapping(tmp_path, capsys):
    src = tmp_path / "spam.csv"
    src.write_text('message,category\n"Win £1000, call now",spam\n"See you, ""soon""",ham\n', encoding="utf-8")
    out = tmp_path / "cls.jsonl"
    assert main(["data", "convert", "--from", "csv", str(src), str(out), "--task", "classification",
                 "--map", "text=message", "--map", "label=category"]) == 0
    assert read(out) == [{"text": "Win £1000, call now", "label": "spam"}, {"text": 'See you, "soon"', "label": "ham"}]
    assert "2 row(s), classification" in capsys.readouterr().out
    assert validate_file(out, task="classification", min_examples=1).errors == []


def test_csv_ner_and_qa_list_fields(tmp_path):
    src = tmp_path / "ner.csv"
    src.write_text('tokens,tags\nEmma visits Paris,B-person O B-location\n"[""New"", ""York""]","[""B-location"", ""I-location""]"\n')
    out = convert("csv", src, tmp_path / "ner.jsonl", task="ner")
    assert read(out.path) == [{"tokens": ["Emma", "visits", "Paris"], "tags": ["B-person", "O", "B-location"]},
                              {"tokens": ["New", "York"], "tags": ["B-location", "I-location"]}]
    qa = tmp_path / "qa.csv"
    qa.write_text("question,answers,context\nWhere?,France,Paris is in France.\nWho?,Bob,\n")
    assert read(convert("csv", qa, tmp_path / "qa.jsonl", task="qa").path) == [
        {"question": "Where?", "answers": ["France"], "context": "Paris is in France."},
        {"question": "Who?", "answers": ["Bob"]}]


def test_csv_prompt_completion_and_errors(tmp_path):
    src = tmp_path / "pc.csv"
    src.write_text("question,answer\nWhat is 2+2?,4\n\"multi\nline\",\nlast,row\n")
    with pytest.raises(DataError) as err:
        convert("csv", src, tmp_path / "pc.jsonl", mapping={"prompt": "question", "completion": "answer"})
    # the bad record starts on line 3 (its quoted cell runs over two lines)
    assert f"{src}:3: error missing_field: `completion`" in str(err.value)
    src.write_text("question,answer\nWhat is 2+2?,4\n")
    out = convert("csv", src, tmp_path / "pc.jsonl", mapping={"prompt": "question", "completion": "answer"})
    assert read(out.path) == [{"prompt": "What is 2+2?", "completion": "4"}] and out.format == "prompt_completion"
    with pytest.raises(DataError, match=r"missing column\(s\) 'prompt', 'completion'.*--map FIELD=COLUMN"):
        convert("csv", src, tmp_path / "pc.jsonl")
    with pytest.raises(DataError, match="--map label=...: label is not a field"):
        convert("csv", src, tmp_path / "pc.jsonl", mapping={"label": "answer"})


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({
        "sentence": datasets.Value("string"),
        "coarse": datasets.ClassLabel(names=["negative", "positive"]),
        "words": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-person", "I-person"])),
    })
    train = datasets.Dataset.from_dict({
        "sentence": ["Anna smiled", "Rain again"], "coarse": [1, 0],
        "words": [["Anna", "smiled"], ["Rain", "again"]], "ner_tags": [[1, 0], [0, 0]]}, features=features)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(folder))

    out = convert("hf-datasets", folder, tmp_path / "cls.jsonl", task="classification",
                  mapping={"text": "sentence", "label": "coarse"})
    assert read(out.path) == [{"text": "Anna smiled", "label": "positive"}, {"text": "Rain again", "label": "negative"}]
    assert main(["data", "convert", "--from", "hf-datasets", str(folder), str(tmp_path / "ner.jsonl"), "--task", "ner",
                 "--map", "tokens=words", "--map", "tags=ner_tags", "--split", "test"]) == 0
    assert read(tmp_path / "ner.jsonl") == [{"tokens": ["Anna", "smiled"], "tags": ["B-person", "O"]}]
    raw = read(convert("hf-datasets", folder, tmp_path / "raw.jsonl").path)  # all columns, labels as names
    assert raw[0] == {"sentence": "Anna smiled", "coarse": "positive", "words": ["Anna", "smiled"],
                      "ner_tags": ["B-person", "O"]}
    with pytest.raises(DataError, match="choose a split with --split"):
        convert("hf-datasets", folder, tmp_path / "x.jsonl", split="validation")
    bad = datasets.Dataset.from_dict({"sentence": ["ok", ""], "coarse": [1, 0]}, features=datasets.Features(
        {"sentence": datasets.Value("string"), "coarse": datasets.ClassLabel(names=["negative", "positive"])}))
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad row 1: error missing_field: `text`"):
        convert("hf-datasets", tmp_path / "bad", tmp_path / "x.jsonl", task="classification",
                mapping={"text": "sentence", "label": "coarse"})


def test_datasets_is_imported_only_for_hf_datasets():
    code = "import sys, slmtune.cli, slmtune.data.convert; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_sources_other_than_csv_and_datasets_refuse_task_options(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(DataError, match="--from alpaca writes chat data"):
        convert("alpaca", src, tmp_path / "o.jsonl", task="ner")
