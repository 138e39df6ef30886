"""The judge of score_model graders on this machine (slmtune/graders.py calls it `ask`): the model
or run directory a grader names, loaded here once. Used by GRPO training and `slmtune grade`; the
service asks its serving engine instead (slmtune/service/routes/graders.py).

    ask = local_judge()
    ask("smollm2-135m-instruct", [{"role": "user", "content": "Score 0-1: ..."}], {"temperature": 0})
"""

from __future__ import annotations

from typing import Callable

from slmtune.generation import SamplingParams, chat_prompt_ids, complete
from slmtune.graders import judge_sampling
from slmtune.training.rundir import load_for_inference


def local_judge(loaded: dict | None = None) -> Callable[[str, list[dict], dict], str]:
    """The `ask` of score_model graders (slmtune/graders.py) on this machine: the named model or run
    directory, loaded once (`loaded` may hold models already in memory, name -> (model, tokenizer)),
    answers the grader's messages with its sampling_params (graders.judge_sampling: temperature 0
    by default, at most 64 tokens)."""
    models = dict(loaded or {})

    def ask(name: str, messages: list[dict], params: dict) -> str:
        if name not in models:
            models[name] = load_for_inference(name)
        judge, judge_tokenizer = models[name]
        max_tokens, temperature, seed = judge_sampling(params)
        [reply] = complete(judge, judge_tokenizer, [chat_prompt_ids(judge_tokenizer, messages)],
                           SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed))
        return reply.text

    return ask
