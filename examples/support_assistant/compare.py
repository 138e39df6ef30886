"""Ask the held-out questions to the base model and to a fine-tuned run; count facts each gets right.

    python examples/support_assistant/compare.py runs/quickstart
    python examples/support_assistant/compare.py runs/quickstart --gguf exports/lumo/model.gguf

With --gguf (a `slmtune export --format gguf` of the run; needs `pip install -e ".[gguf]"`) the
fine-tuned answers are also asked of llama.cpp running that file, and its facts are counted too.
The questions in heldout.jsonl are paraphrases that do not appear in train.jsonl; an answer counts
as right when it contains the expected fact (case-insensitive).
"""

import argparse
import json
import sys
import textwrap
from pathlib import Path

from slmtune.chat import generate_reply
from slmtune.export.gguf import LlamaCppCandidate
from slmtune.generation import SamplingParams, chat_prompt_ids, complete_with
from slmtune.models import end_of_turn_ids
from slmtune.scoring import states_fact
from slmtune.training.rundir import load_for_inference

HERE = Path(__file__).parent
SYSTEM = json.loads((HERE / "train.jsonl").open().readline())["messages"][0]["content"]


def score(run_dir: str, echo=print, gguf: str | None = None) -> dict[str, int]:
    """Facts right out of the held-out questions, for the base model and the fine-tuned run (and the
    run's GGUF export through llama.cpp when `gguf` is given)."""
    model, tokenizer = load_for_inference(run_dir)
    questions = [json.loads(line) for line in (HERE / "heldout.jsonl").open()]
    right = {"base": 0, "fine-tuned": 0} | ({"gguf": 0} if gguf else {})
    llamacpp = LlamaCppCandidate(gguf) if gguf else None
    for item in questions:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": item["question"]}]
        with model.disable_adapter():
            base = generate_reply(model, tokenizer, messages, max_new_tokens=60)
        answers = [("base", base), ("fine-tuned", generate_reply(model, tokenizer, messages, max_new_tokens=60))]
        if llamacpp is not None:
            # The same prompt ids, greedy, 60 tokens, through llama.cpp's own weights and kernels.
            [reply] = complete_with(llamacpp.decoder, tokenizer, [chat_prompt_ids(tokenizer, messages)],
                                    SamplingParams(max_tokens=60, temperature=0.0),
                                    eos_ids=end_of_turn_ids(model, tokenizer) | llamacpp.extra_eos_ids)
            answers.append(("gguf", reply.text.strip()))
        echo(f"\nQ: {item['question']}   (expects: {' or '.join(item['answer_contains'])})")
        for label, answer in answers:
            ok = states_fact(answer, item["answer_contains"])
            right[label] += ok
            first = textwrap.shorten(answer.replace("\n", " "), 150)
            echo(f"  {'✓' if ok else '✗'} {label:>10}: {first}")
    if llamacpp is not None:
        llamacpp.close()
    return right | {"questions": len(questions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default="runs/quickstart")
    parser.add_argument("--gguf", help="the run's GGUF export, answered through llama.cpp too")
    args = parser.parse_args(argv)
    right = score(args.run_dir, gguf=args.gguf)
    n = right["questions"]
    gguf = f", GGUF through llama.cpp {right['gguf']}/{n}" if args.gguf else ""
    print(f"\nFacts answered correctly on {n} held-out questions: base {right['base']}/{n}, "
          f"fine-tuned {right['fine-tuned']}/{n}{gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
