import pytest

from slmtune.data.tokenize import IGNORE, TemplateError, check_end_of_turn, encode, encode_chat


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t in example.targets if t != IGNORE])


def test_chat_trains_only_assistant_turns_with_end_of_turn(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello world"}]
    example = encode_chat(messages, tiny_tokenizer)
    assert len(example.input_ids) == len(example.targets)
    assert trained_text(tiny_tokenizer, example) == "Hello world<|im_end|>\n"
    # targets are shifted labels: wherever a target is set, it is the next input token
    for t in range(len(example.input_ids) - 1):
        if example.targets[t] != IGNORE:
            assert example.targets[t] == example.input_ids[t + 1]
    # the full render is exactly what the template produces for inference
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert tiny_tokenizer.decode(example.input_ids) == rendered


def test_weight_zero_turns_are_context_only(tiny_tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "wrong answer", "weight": 0},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "right answer"}]
    assert trained_text(tiny_tokenizer, encode_chat(messages, tiny_tokenizer)) == "right answer<|im_end|>\n"


def test_system_prompt_is_added_when_missing(tiny_tokenizer):
    data = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with_system = encode("chat", data, tiny_tokenizer, None, system_prompt="Be kind.")
    assert "Be kind." in tiny_tokenizer.decode(with_system.input_ids)


def test_prompt_completion_and_text(tiny_tokenizer):
    pc = encode("prompt_completion", {"prompt": "Question: ", "completion": "Answer"}, tiny_tokenizer, None)
    assert trained_text(tiny_tokenizer, pc) == "Answer<|im_end|>"
    text = encode("text", {"text": "hello world"}, tiny_tokenizer, None)
    assert tiny_tokenizer.decode(text.input_ids) == "hello world<|im_end|>"
    assert text.n_targets() == len(text.input_ids) - 1


def test_truncation_keeps_the_start(tiny_tokenizer):
    full = encode("text", {"text": "hello world " * 20}, tiny_tokenizer, None)
    cut = encode("text", {"text": "hello world " * 20}, tiny_tokenizer, 16)
    assert len(cut) == 16 and cut.input_ids == full.input_ids[:16]


def test_round_trip_accepts_a_good_template(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    check_end_of_turn(messages, tiny_tokenizer, {tiny_tokenizer.eos_token_id})


def test_round_trip_rejects_a_template_that_drops_end_of_turn(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if m['role'] != 'assistant' %}{{ '<|im_end|>\n' }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(TemplateError, match="never learn to stop"):
        check_end_of_turn(messages, tok, {tok.eos_token_id})


def test_template_that_is_not_prefix_stable_is_rejected(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="prefix-stable"):
        encode_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)
