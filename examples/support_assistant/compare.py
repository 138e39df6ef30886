"""Ask the held-out questions to the base model and to a fine-tuned run; count facts each gets right.

    python examples/support_assistant/compare.py runs/quickstart

The questions in heldout.jsonl are paraphrases that do not appear in train.jsonl; an answer counts
as right when it contains the expected fact (case-insensitive).
"""

import json
import sys
import textwrap
from pathlib import Path

from slmtune.chat import generate_reply
from slmtune.training.rundir import load_for_inference

HERE = Path(__file__).parent
SYSTEM = json.loads((HERE / "train.jsonl").open().readline())["messages"][0]["content"]


def score(run_dir: str, echo=print) -> dict[str, int]:
    """Facts right out of the held-out questions, for the base model and the fine-tuned run."""
    model, tokenizer = load_for_inference(run_dir)
    questions = [json.loads(line) for line in (HERE / "heldout.jsonl").open()]
    right = {"base": 0, "fine-tuned": 0}
    for item in questions:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]}]
        with model.disable_adapter():
            base = generate_reply(model, tokenizer, messages, max_new_tokens=60)
        tuned = generate_reply(model, tokenizer, messages, max_new_tokens=60)
        echo(f"\nQ: {item['question']}   (expects: {' or '.join(item['answer_contains'])})")
        for label, answer in (("base", base), ("fine-tuned", tuned)):
            ok = any(key.lower() in answer.lower() for key in item["answer_contains"])
            right[label] += ok
            first = textwrap.shorten(answer.replace("\n", " "), 150)
            echo(f"  {'✓' if ok else '✗'} {label:>10}: {first}")
    return right | {"questions": len(questions)}


def main(run_dir: str) -> int:
    right = score(run_dir)
    n = right["questions"]
    print(f"\nFacts answered correctly on {n} held-out questions: base {right['base']}/{n}, "
          f"fine-tuned {right['fine-tuned']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))
