import json

import pytest

from slmtune.data.validate import validate_file
from tests.conftest import chat_example, write_jsonl

GOOD = json.dumps(chat_example("Hi?", "Hello."))

# (code, bad line) — the bad line is written as line 3 of a file of otherwise good examples.
CASES = [
    ("invalid_json", '{"messages": [}'),
    ("not_an_object", "[1, 2]"),
    ("unknown_format", '{"question": "x"}'),
    ("missing_messages", '{"messages": []}'),
    ("unknown_role", '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}'),
    ("empty_content", '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}'),
    ("no_assistant_message", '{"messages": [{"role": "user", "content": "x"}]}'),
    ("bad_weight", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}'),
    ("bad_weight", '{"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}'),
    ("mixed_formats", '{"prompt": "x", "completion": "y"}'),
    ("invalid_message", '{"messages": ["hello", {"role": "assistant", "content": "y"}]}'),
]


@pytest.mark.parametrize("code,bad", CASES, ids=[c for c, _ in CASES])
def test_each_code_fires_with_its_line(tmp_path, code, bad):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, bad] + [GOOD] * 10)
    report = validate_file(path)
    assert [(i.code, i.line) for i in report.errors] == [(code, 3)]
    assert f"{path}:3: error {code}:" in str(report.errors[0])


def test_invalid_encoding(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes((GOOD + "\n").encode() * 11 + b'{"text": "caf\xe9"}\n')
    assert [(i.code, i.line) for i in validate_file(path).errors] == [("invalid_encoding", 12)]


def test_too_few_examples_and_clean_file(tmp_path):
    few = validate_file(write_jsonl(tmp_path / "few.jsonl", [GOOD] * 9))
    assert [i.code for i in few.errors] == ["too_few_examples"]
    ok = validate_file(write_jsonl(tmp_path / "ok.jsonl", [GOOD] * 10))
    assert ok.errors == [] and ok.n_examples == 10 and ok.format == "chat"


def test_prompt_completion_and_text_fields(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}] * 10 + [{"prompt": "a", "completion": ""}]
    report = validate_file(write_jsonl(tmp_path / "pc.jsonl", rows))
    assert [(i.code, i.line) for i in report.errors] == [("missing_field", 11)]
    rows = [{"text": "abc"}] * 10 + [{"text": 5}]
    report = validate_file(write_jsonl(tmp_path / "t.jsonl", rows))
    assert [(i.code, i.line) for i in report.errors] == [("missing_field", 11)]


def test_with_tokenizer_reports_truncation(tmp_path, tiny_tokenizer):
    long = json.dumps(chat_example("Tell me everything. " * 30, "Sure."))
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD] * 10 + [long])
    report = validate_file(path, tokenizer=tiny_tokenizer, max_length=64)
    warnings = [(i.code, i.line) for i in report.warnings]
    assert warnings == [("too_long", 11)]
    assert report.tokens_cut > 0 and report.total_tokens > report.tokens_cut
    # The long example's answer lies beyond the cut, so nothing of it is trained either.
    assert [(i.code, i.line) for i in report.errors] == [("no_trainable_tokens", 11)]


def test_deep_nesting_long_lines_and_many_bad_lines_are_reported_not_crashes(tmp_path, monkeypatch):
    """A line nested thousands of levels deep, a line beyond the length cap and 10,000 bad lines:
    each is a coded issue, the listed issues are capped (the rest counted), and nothing raises."""
    from slmtune.cli import main
    from slmtune.data import formats, validate

    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 300_000)
    monkeypatch.setattr(validate, "MAX_LINE_BYTES", 300_000)
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good] * 12 + ["[" * 100000 + "]" * 100000, "x" * 400_000, good]
                              + ["not json"] * 10000) + "\n")
    report = validate.validate_file(path)
    codes = {i.line: i.code for i in report.issues}
    assert codes[13] == "nested_too_deeply" and codes[14] == "line_too_long"
    assert report.n_examples == 13 and len(report.issues) == validate.MAX_LISTED_ISSUES
    assert report.n_errors == 10002
    assert main(["data", "validate", str(path)]) == 1
