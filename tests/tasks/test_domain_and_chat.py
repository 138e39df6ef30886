import math
import random

import pytest

from slmtune.tasks import chat, domain
from tests.tasks.shared import shared_rows


def test_domain_example_and_perplexity_by_hand():
    assert domain.to_example({"text": "PEP 8 -- Style"}) == {"text": "PEP 8 -- Style"}
    assert domain.parse("  x \n", {"text": "t"}) == "x"
    losses = [{"loss_sum": 2.0, "n_tokens": 2}, {"loss_sum": 4.0, "n_tokens": 2}]
    metrics = domain.score([None, None], [{"text": "a"}, {"text": "b"}], losses=losses)
    assert metrics["loss"] == pytest.approx(1.5) and metrics["perplexity"] == pytest.approx(math.exp(1.5))
    assert metrics["tokens"] == 4
    assert domain.score(losses, [{"text": "a"}])["loss"] == pytest.approx(1.5)  # losses as predictions
    assert domain.check({"text": " "})[0][0] == "missing_field"


def test_chat_example_round_trip_on_shared_data():
    rows = shared_rows("chat", "validation", 50)
    for row in rows:
        example = chat.to_example(row)
        assert example == {"messages": row["messages"]}
        assert chat.parse(example["messages"][-1]["content"], row) == chat.reference(row).strip()
    assert chat.score([chat.reference(r) for r in rows], rows)["rouge_l"] == pytest.approx(1.0)


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 tokens each way
    assert chat.rouge_l("the cat is on the mat", "The cat sat on the mat.") == pytest.approx(5 / 6)
    # LCS 2 ("a c"): P 2/2, R 2/4 -> F 2/3
    assert chat.rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert chat.rouge_l("", "a") == 0.0
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b c d"}]}] * 2
    metrics = chat.score(["a c", "a b c d"], rows, losses=[{"loss_sum": 3.0, "n_tokens": 3}])
    assert metrics["rouge_l"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["loss"] == pytest.approx(1.0) and metrics["perplexity"] == pytest.approx(math.e)


def test_lcs_matches_dynamic_programming():
    def dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]

    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 40))]
        assert chat.lcs_length(a, b) == dp(a, b)


def test_chat_check_reuses_the_chat_codes():
    assert chat.check({"messages": [{"role": "user", "content": "x"}]})[0][0] == "no_assistant_message"
