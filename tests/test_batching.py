import random

import pytest
import torch

from slmtune.data.batching import (collate, example_steps, micro_batches, pack_rows, should_pack,
                                   step_micro_batches)
from slmtune.data.tokenize import encode
from slmtune.models import load_model, load_tokenizer
from slmtune.training.loss import target_loss_sum


def test_pack_rows_respects_capacity_and_keeps_every_example():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # best-fit decreasing wastes little: within 10% of the lower bound
    assert len(rows) <= 1.1 * sum(lengths) / 128 + 1


def test_should_pack():
    assert should_pack([100] * 10, 1024)
    assert not should_pack([900] * 10, 1024)


def test_micro_batches_are_deterministic_per_epoch():
    rows = [[i] for i in range(10)]
    assert micro_batches(rows, 3, seed=1, epoch=0) == micro_batches(rows, 3, seed=1, epoch=0)
    assert micro_batches(rows, 3, seed=1, epoch=0) != micro_batches(rows, 3, seed=1, epoch=1)
    assert sorted(r[0] for mb in micro_batches(rows, 3, 1, 0) for r in mb) == list(range(10))


def _examples(tokenizer, n=5):
    texts = [("Hi", "Hello there"), ("What is 2+2?", "4"), ("Name a city", "Paris is a city in France"),
             ("Lamp battery?", "41 hours"), ("Reset?", "Hold the power button for 12 seconds")]
    return [encode("chat", {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                   tokenizer, None) for q, a in texts[:n]]


@pytest.mark.parametrize("attn", ["sdpa", "per_example", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, attn):
    from slmtune.training.attention import use_per_example_attention

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), attn_implementation="sdpa" if attn == "per_example" else attn)
    if attn == "per_example":
        use_per_example_attention(model)
        attn = "sdpa"
    examples = _examples(tokenizer)
    pad = tokenizer.pad_token_id
    unpacked = sum(target_loss_sum(model, collate([[e]], pad, False, attn), None).item() for e in examples)
    packed_batch = collate([examples[:3], examples[3:]], pad, True, attn)
    packed = target_loss_sum(model, packed_batch, None).item()
    assert packed == pytest.approx(unpacked, rel=1e-5, abs=1e-5)
    # Padded, unpacked batches agree as well.
    padded = target_loss_sum(model, collate([[e] for e in examples], pad, False, attn), None).item()
    assert padded == pytest.approx(unpacked, rel=1e-5, abs=1e-5)


def test_packed_examples_do_not_see_each_other(tiny_llama_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    model = load_model(str(tiny_llama_dir))
    a, b, c = _examples(tokenizer, 3)
    with_a = target_loss_sum(model, collate([[a, c]], tokenizer.pad_token_id, True), None)
    with_b = target_loss_sum(model, collate([[b, c]], tokenizer.pad_token_id, True), None)
    alone_a = target_loss_sum(model, collate([[a]], tokenizer.pad_token_id, True), None)
    alone_b = target_loss_sum(model, collate([[b]], tokenizer.pad_token_id, True), None)
    # c's contribution is the same whichever example precedes it
    assert (with_a - alone_a).item() == pytest.approx((with_b - alone_b).item(), rel=1e-5, abs=1e-5)


def test_packed_collate_positions_and_mask(tiny_tokenizer):
    e1, e2 = _examples(tiny_tokenizer, 2)
    batch = collate([[e1, e2], [e1]], tiny_tokenizer.pad_token_id, True)
    n1, n2 = len(e1), len(e2)
    assert batch["position_ids"][0, :n1].tolist() == list(range(n1))
    assert batch["position_ids"][0, n1 : n1 + n2].tolist() == list(range(n2))
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, n1 + n2, n1 + n2) and mask.dtype == torch.bool
    assert not mask[0, 0, n1, : n1].any()  # first token of e2 sees nothing of e1
    assert mask[0, 0, n1 + n2 - 1, n1 : n1 + n2].all()
    assert batch["n_tokens"] == 2 * n1 + n2


@pytest.mark.parametrize("packing", [True, False])
def test_example_steps_take_every_example_once_n_per_step(packing):
    lengths = [random.Random(i).randint(5, 60) for i in range(23)]
    steps = example_steps(23, 8, seed=1, epoch=0)
    assert [len(s) for s in steps] == [8, 8, 7]
    assert sorted(i for s in steps for i in s) == list(range(23))
    assert steps == example_steps(23, 8, seed=1, epoch=0) != example_steps(23, 8, seed=1, epoch=1)
    for examples in steps:
        batches = step_micro_batches(examples, lengths, 100, packing, micro_batch_size=2)
        rows = [row for mb in batches for row in mb]
        assert all(len(mb) <= 2 for mb in batches)
        assert sorted(i for row in rows for i in row) == sorted(examples)
        if packing:
            assert all(sum(lengths[i] for i in row) <= 100 for row in rows) and len(rows) < len(examples)
        else:
            assert all(len(row) == 1 for row in rows)
