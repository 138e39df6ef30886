"""The defaults that adapt to the user's data (slmtune/auto.py): one "auto" rule for recipes, the CLI
and the service; a seeded held-out validation split; the best checkpoint as the result; early
stopping; a time budget."""

import json
import threading
import traceback

import pytest
from safetensors.torch import load_file

from slmtune import auto, models
from slmtune.cli import main as cli_main
from slmtune.config import load_recipe, recipe_from_dict
from slmtune.data.dataset import CountTooSlow, build_datasets, count_target_tokens
from slmtune.data.formats import MAX_MESSAGES, DataError, check_example
from slmtune.data.validate import read_records
from slmtune.evaluate import evaluate
from slmtune.models import load_tokenizer
from slmtune.http.errors import ApiError
from slmtune.service import hyper, jobs
from slmtune.service.models import File
from slmtune.service.settings import Settings
from slmtune.training import events
from slmtune.training import run as train_run
from slmtune.training.loop import TimeBudget
from slmtune.training.run import run
from tests.conftest import REPO, chat_example, write_jsonl
from tests.test_models import real_home


def facts(n: int) -> list[dict]:
    return [chat_example(f"What is fact number {i}?", f"Fact {i}: the lamp lasts {i} hours.") for i in range(n)]


def tiny_recipe(model_dir, data, out, **train):
    return recipe_from_dict({
        "model": {"name": str(model_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(data), "max_length": 64},
        "train": {"seed": 3, "precision": "fp32", **train},
        "output": {"dir": str(out)},
    })


def test_the_operator_sets_the_precision_jobs_train_in(monkeypatch, tmp_path):
    monkeypatch.setenv("SLMTUNE_TRAIN_PRECISION", "fp32")
    settings = Settings(home=tmp_path)
    assert settings.train_precision == "fp32"
    made = hyper.build_recipe(base="m", method="lora", train_path="t.jsonl", validation_path=None,
                              resolved=hyper.resolve({}, 40), seed=1, run_dir="o", n_examples=40, save_every=0,
                              threads=None, precision=settings.train_precision)
    assert made.train.precision == "fp32"
    monkeypatch.setenv("SLMTUNE_TRAIN_PRECISION", "fp16")
    with pytest.raises(ValueError, match="train_precision"):
        Settings(home=tmp_path)


@pytest.mark.parametrize("n", [8, 40, 75, 300, 2000])
def test_the_rule_is_one_function_for_the_service_and_recipes(n):
    service = hyper.resolve({}, n)
    recipe = recipe_from_dict({"model": {"name": "m"}, "data": {"train": "t.jsonl"}, "output": {"dir": "o"}})
    resolved = recipe.train.resolved_for_data(n, "lora")
    assert service["n_epochs"] == resolved.epochs == auto.epochs(n)
    made = hyper.build_recipe(base="m", method="lora", train_path="t.jsonl", validation_path=None, resolved=service,
                              seed=1, run_dir="o", n_examples=n, save_every=0, threads=None)
    assert made.train.learning_rate == resolved.learning_rate == auto.learning_rate("lora")
    assert 3 <= resolved.epochs <= 10
    dpo = hyper.resolve({}, n, "dpo")
    assert dpo["n_epochs"] == auto.epochs(n, "dpo") and dpo["beta"] == auto.DPO_BETA
    rft = hyper.resolve({}, n, "reinforcement")
    grader = {"type": "string_check", "operation": "eq", "input": "{{sample.output_text}}", "reference": "x"}
    job = hyper.build_recipe(base="m", method="lora", train_path="t.jsonl", validation_path=None, resolved=rft, seed=1,
                             run_dir="o", n_examples=n, save_every=0, threads=None, method_type="reinforcement",
                             grader=grader)
    cli = recipe_from_dict({"model": "m", "data": {"train": "t.jsonl"}, "output": {"dir": "o"},
                            "train": {"objective": {"name": "grpo", "grader": grader}}}).train.resolved_for_data(n, "lora")
    assert job.train.epochs == cli.epochs == rft["n_epochs"] == auto.epochs(n, "grpo")
    assert job.train.learning_rate == cli.learning_rate == auto.learning_rate("lora", "grpo")
    assert job.train.objective.prompts_per_step == cli.objective.prompts_per_step == rft["batch_size"]
    assert job.train.objective.num_generations == cli.objective.num_generations == auto.GRPO_GENERATIONS
    assert job.train.eval_every == rft["eval_interval"] == auto.eval_every(
        hyper.steps_of(rft, n, validation_file=False))


def test_epochs_count_examples_and_answer_tokens():
    assert auto.epochs(75) == auto.epochs(75, target_tokens=100_000) == 7  # ceil(500 / 75): examples decide
    assert auto.epochs(290) == 3 and auto.epochs(290, target_tokens=1313) == 10  # one-label answers: tokens decide
    # examples/intents: 1,476 answer tokens in 288 rows; of them 32 held out, so an epoch trains ~1,312
    assert auto.epochs(288, target_tokens=1476) == 9 and auto.epochs(288, target_tokens=1476, held_out=32) == 10
    assert auto.epochs(1000, target_tokens=2000) == 6  # ceil(12,000 / 2,000)
    assert auto.epochs(5000, target_tokens=100) == auto.SFT_EPOCHS[1]  # clamped
    assert auto.epochs(75, "dpo", target_tokens=10) == auto.epochs(75, "dpo")  # pairs count pairs only


@pytest.mark.parametrize("n, held_out", [(167, 0), (250, 32), (288, 0), (1000, 100), (5000, 256), (75, 0)])
def test_counting_may_stop_where_the_rule_stops_looking_at_tokens(n, held_out):
    """The service stops counting a file's answer tokens at auto.tokens_enough: from there on the
    count cannot change the epochs, just below it it can."""
    enough = auto.tokens_enough(n, held_out)
    assert (auto.epochs(n, "sft", enough, held_out) == auto.epochs(n, "sft", 50 * enough, held_out)
            == auto.epochs(n, "sft", None, held_out))
    if auto.epochs(n) == auto.SFT_EPOCHS[0]:  # the examples term leaves room for the tokens' one (not 75's 7)
        assert auto.epochs(n, "sft", enough - 2, held_out) == auto.SFT_EPOCHS[0] + 1


def test_counting_a_files_answer_tokens_matches_the_datasets_count(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", facts(300))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    recipe = tiny_recipe(tiny_llama_dir, data, tmp_path / "run")
    built = build_datasets(recipe.data, tokenizer, seed=5)
    assert built.held_out == 32 and count_target_tokens(recipe.data, tokenizer) == built.n_target_tokens
    stopped = count_target_tokens(recipe.data, tokenizer, enough=500)
    per_row = built.n_target_tokens / 300
    assert 500 <= stopped < 500 + 2 * per_row + 10  # stopped at the row that reached 500


def qa_rows(n: int, with_context: int) -> list[dict]:
    return [{"question": f"What colour is lamp {i}?", "answers": [f"colour {i}"]}
            | ({"context": f"Lamp {i} is sold in colour {i} only."} if i < with_context else {}) for i in range(n)]


@pytest.mark.parametrize("with_context", [0, 150, 300])
def test_answers_copied_from_the_row_do_not_count_toward_epochs(tiny_llama_dir, tmp_path, with_context):
    """Extractive QA (an answer copied from the row's context) needs no memorizing: its tokens leave the
    rule's token term, so a file of such rows gets the examples term alone (QA with context lost 4.7
    points F1 at the token term's 7 epochs against 1, docs/benchmarks.md); closed-book rows count."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(300, with_context))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    recipe = recipe_from_dict({"model": {"name": str(tiny_llama_dir)}, "method": "lora",
                               "data": {"train": str(data), "task": "qa", "max_length": 256},
                               "train": {"seed": 3}, "output": {"dir": str(tmp_path / "run")}})
    built = build_datasets(recipe.data, tokenizer, seed=3)
    every_answer = sum(e.n_targets() for e in built.train + built.validation)
    assert built.n_target_tokens == round(every_answer * (300 - with_context) / 300)
    assert count_target_tokens(recipe.data, tokenizer) == built.n_target_tokens
    epochs = recipe.train.resolved_for_data(built.n_examples, "lora", built.n_target_tokens, built.held_out).epochs
    examples_term = auto.epochs(300)
    assert (epochs == examples_term) if with_context == 300 else (epochs > examples_term)
    # The same answers as a chat file (no task: nothing is known to be copied) count whole.
    assert auto.epochs(300, target_tokens=every_answer, held_out=built.held_out) > examples_term


def test_the_service_counts_a_file_once_even_when_it_cannot(tiny_llama_dir, tmp_path, monkeypatch):
    """Uploaded files never change: a (model, file) is counted once per process, and a file that
    cannot be counted (every answer cut by max_length) fails the same way again without counting."""
    calls = []
    monkeypatch.setattr(hyper, "count_target_tokens", lambda *a, **k: calls.append(a) or count_target_tokens(*a, **k))
    good = write_jsonl(tmp_path / "good.jsonl", facts(20))
    cut = write_jsonl(tmp_path / "cut.jsonl", [chat_example("Why " + "really " * 1500 + "?", "yes")] * 12)
    assert hyper.target_tokens_of(str(tiny_llama_dir), str(good), 20) == hyper.target_tokens_of(
        str(tiny_llama_dir), str(good), 20) > 20
    for _ in range(2):
        with pytest.raises(DataError, match="no example has trainable tokens") as err:
            hyper.target_tokens_of(str(tiny_llama_dir), str(cut), 12)
        # raised afresh each time: its traceback does not grow, nor reach the count's frame (its rows)
        assert [frame.name for frame in traceback.extract_tb(err.value.__traceback__)] == [
            "test_the_service_counts_a_file_once_even_when_it_cannot", "target_tokens_of"]
    assert len(calls) == 2
    # A count that runs out of time (at a row boundary) is not remembered: it depends on the load.
    for _ in range(2):
        with pytest.raises(CountTooSlow, match=r"took more than 1e-09 s \(0 of 20 rows"):
            hyper.target_tokens_of(str(tiny_llama_dir), str(good), 20, validation_file=True, time_limit=1e-9)
    assert len(calls) == 4
    # Through the service: a 400 naming the file by its id, with its own code and the way around it.
    settings = Settings(home=tmp_path / "home", models={"base": str(tiny_llama_dir)}, token_count_seconds=1e-9)
    uploaded = File(id="file-abc", path=str(good), n_examples=20)
    with pytest.raises(ApiError) as err:
        jobs.count_target_tokens(settings, "base", uploaded)
    assert (err.value.status, err.value.code) == (400, "token_count_too_slow")
    assert "`file-abc`" in str(err.value) and str(good) not in str(err.value) and "n_epochs" in str(err.value)


def test_a_slow_count_holds_up_its_own_file_only(tiny_llama_dir, tmp_path, monkeypatch):
    """Requests for one file wait for one count; another file's count goes on meanwhile."""
    slow, quick = write_jsonl(tmp_path / "slow.jsonl", facts(20)), write_jsonl(tmp_path / "quick.jsonl", facts(20))
    started, release, calls = threading.Event(), threading.Event(), []

    def counting(data, *args):
        calls.append(data.train)
        if data.train == str(slow):
            started.set()
            assert release.wait(60)
        return count_target_tokens(data, *args)

    monkeypatch.setattr(hyper, "count_target_tokens", counting)
    results = []
    waiting = [threading.Thread(target=lambda: results.append(hyper.target_tokens_of(str(tiny_llama_dir), str(slow), 20)))
               for _ in range(2)]
    waiting[0].start()
    assert started.wait(60)
    waiting[1].start()
    assert hyper.target_tokens_of(str(tiny_llama_dir), str(quick), 20) > 20  # while slow.jsonl is being counted
    release.set()
    for thread in waiting:
        thread.join(60)
    assert len(results) == 2 and results[0] == results[1] and calls.count(str(slow)) == 1


def test_a_chat_example_of_too_many_messages_is_an_error(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * (MAX_MESSAGES // 2 + 1)
    data = write_jsonl(tmp_path / "long.jsonl", [{"messages": turns}] * 10)
    with pytest.raises(DataError, match=f"long.jsonl:1: error too_many_messages: `messages` holds {MAX_MESSAGES + 2} messages"):
        read_records(data)


def _turns(n: int, last: str = "user") -> list[dict]:
    roles = ["user", "assistant"] * n
    return [{"role": role, "content": "hi"} for role in roles[:n - 1]] + [{"role": last, "content": "hi"}]


# Every format whose rows hold a list of messages has the same cap: (format, a row of n messages).
MESSAGE_LISTS = {
    "chat": lambda n: {"messages": _turns(n, "assistant")},
    "preference, OpenAI's shape": lambda n: {"input": {"messages": _turns(n)},
                                             "preferred_output": [{"role": "assistant", "content": "a"}],
                                             "non_preferred_output": [{"role": "assistant", "content": "b"}]},
    "preference, prompt/chosen/rejected": lambda n: {"prompt": _turns(n), "chosen": "a", "rejected": "b"},
    "reinforcement": lambda n: {"messages": _turns(n)},
}


@pytest.mark.parametrize("kind", MESSAGE_LISTS)
def test_every_message_list_holds_at_most_max_messages(kind):
    fmt = kind.split(",")[0]
    assert check_example(fmt, MESSAGE_LISTS[kind](MAX_MESSAGES + 1)) == [
        ("too_many_messages", f"{'the prompt' if fmt == 'preference' else '`messages`'} holds {MAX_MESSAGES + 1} "
                              f"messages, more than the {MAX_MESSAGES} an example may have")]
    assert check_example(fmt, MESSAGE_LISTS[kind](MAX_MESSAGES - 1)) == []  # (odd: a prompt ends with the user's turn)


# (rows, answer, validation file): 40 facts, the examples term (clamped to 10); 250 short answers,
# the tokens term strictly between the clamps, with and without a validation file (nothing held
# out); rows whose answer the data section's max_length cuts away (no trainable token) among them.
PARITY_CASES = [(40, "Fact {i}: the lamp lasts {i} hours.", False, 0), (250, "It is {i}.", False, 0),
                (250, "It is {i}.", True, 0), (250, "It is {i}.", False, 60)]


@pytest.mark.parametrize("n, answer, with_validation, cut_rows", PARITY_CASES)
def test_slmtune_train_resolves_what_the_service_resolves_for_the_same_file(tiny_llama_dir, tmp_path, n, answer,
                                                                            with_validation, cut_rows):
    """The service counts the file's answer tokens with the base model's tokenizer as run() does, and
    holds out the same number of rows (counted as rows, whether or not they have trainable tokens)."""
    long_question = "Why " + "really " * 1500 + "?"  # longer than data.max_length (1024): its answer is cut
    rows = [chat_example(long_question if i < cut_rows else f"Is {i} a number?", answer.format(i=i))
            for i in range(n)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", facts(10)) if with_validation else None
    assert cli_main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output",
                     str(tmp_path / "run"), "--no-progress", "train.max_steps=1"]
                    + (["--validation", str(val)] if val else [])) == 0
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    held_out = 0 if with_validation else auto.held_out(n)
    assert summary["held_out_examples"] == held_out
    tokens = hyper.target_tokens_of(str(tiny_llama_dir), str(data), n, validation_file=with_validation)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    per_answer = len(tokenizer(answer.format(i=7), add_special_tokens=False)["input_ids"])
    assert (n - cut_rows) * (per_answer - 1) <= tokens <= (n - cut_rows) * (per_answer + 4)  # + end of turn
    service = hyper.resolve({}, n, target_tokens=tokens, validation_file=with_validation)
    job = hyper.build_recipe(base=str(tiny_llama_dir), method="lora", train_path=str(data),
                             validation_path=str(val) if val else None, resolved=service, seed=42, run_dir="o",
                             n_examples=n, save_every=0, threads=None)
    assert saved.train.epochs == job.train.epochs == auto.epochs(n, "sft", tokens, held_out)
    assert saved.train.learning_rate == job.train.learning_rate == 1e-3
    if n == 40:
        assert job.train.epochs == 10
    else:  # the tokens term decides, between the clamps (the examples term alone would give 3)
        assert 3 < job.train.epochs < 10


def test_held_out_split_is_seeded_disjoint_and_reported(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", facts(300))
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    recipe = tiny_recipe(tiny_llama_dir, data, tmp_path / "run")
    first = build_datasets(recipe.data, tokenizer, seed=5)
    again = build_datasets(recipe.data, tokenizer, seed=5)
    other = build_datasets(recipe.data, tokenizer, seed=6)
    assert first.held_out == len(first.validation) == auto.held_out(300) == 32
    assert first.n_examples == 300 and len(first.train) == 268
    ids = lambda ds: {tuple(e.input_ids) for e in ds}  # noqa: E731
    assert ids(first.validation) == ids(again.validation) != ids(other.validation)
    assert not ids(first.validation) & ids(first.train)
    assert auto.held_out(199) == 0 and auto.held_out(5000) == auto.HOLD_OUT_MAX
    small = build_datasets(tiny_recipe(tiny_llama_dir, write_jsonl(tmp_path / "s.jsonl", facts(50)), tmp_path / "r")
                           .data, tokenizer, seed=5)
    assert small.held_out == 0 and not small.validation and len(small.train) == 50
    off = recipe.model_copy(deep=True)
    off.data.validation_split = 0
    assert len(build_datasets(off.data, tokenizer, seed=5).train) == 300


def eval_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["eval_loss"] for e in lines if e["event"] == "eval"}


def rising_run(tiny_llama_dir, tmp_path, **train):
    """A run whose validation loss falls, then rises: full fine-tuning at a high constant rate
    memorizes the training answers, which the validation set contradicts (same questions, other
    answers)."""
    data = write_jsonl(tmp_path / "train.jsonl", facts(24))
    val = write_jsonl(tmp_path / "val.jsonl", [chat_example(f"What is fact number {i}?",
                                                            f"Fact {i}: the kettle weighs {i + 7} grams.")
                                               for i in range(8)])
    return run(recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)}, "method": {"name": "full"},
        "data": {"train": str(data), "validation": str(val), "max_length": 64},
        "train": {"seed": 3, "precision": "fp32", "max_steps": 14, "learning_rate": 0.01, "warmup_ratio": 0.0,
                  "schedule": "constant", "eval_every": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "save_every": 0,
                  "keep_checkpoints": 1, **train},
        "output": {"dir": str(tmp_path / "run")}}), progress=False)


def test_the_result_is_the_checkpoint_of_the_lowest_validation_loss(tiny_llama_dir, tmp_path):
    result = rising_run(tiny_llama_dir, tmp_path)
    losses = eval_losses(result.run_dir)
    best = min(losses, key=losses.get)
    assert losses[14] > losses[best]  # the loss was made to rise: the last step is not the best
    summary = result.summary
    assert summary["best_step"] == summary["result_step"] == best and summary["steps"] == 14
    assert summary["eval_loss"] == pytest.approx(losses[best], abs=1e-6)
    assert summary["last_eval_loss"] == pytest.approx(losses[14], abs=1e-6)
    kept = load_file(result.run_dir / "checkpoints" / f"step-{best:06d}" / "model" / "model.safetensors")
    final = load_file(result.run_dir / "model" / "model.safetensors")
    assert kept.keys() == final.keys() and all((kept[k] == final[k]).all() for k in kept)
    kinds = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in kinds if e["event"] == "best"][-1] == best


def test_select_best_off_keeps_the_last_step(tiny_llama_dir, tmp_path):
    result = rising_run(tiny_llama_dir, tmp_path, select_best=False)
    assert result.summary["result_step"] == 14 and result.summary["best_step"] is None


def test_early_stopping_stops(tiny_llama_dir, tmp_path):
    result = rising_run(tiny_llama_dir, tmp_path, early_stopping_patience=2)
    losses = eval_losses(result.run_dir)
    assert result.summary["stopped_early"] and result.summary["steps"] < 14
    best = min(losses, key=losses.get)
    assert result.summary["result_step"] == best
    after = [s for s in losses if s > best]
    assert len(after) == 2 and all(losses[s] >= losses[best] for s in after)


def intents(n: int) -> list[dict]:
    """Task rows of 3 labels (classification), each text naming its label's topic."""
    topics = {"billing": "my invoice is wrong", "shipping": "where is my parcel", "login": "i cannot sign in"}
    labels = sorted(topics)
    return [{"text": f"{topics[labels[i % 3]]} number {i}", "label": labels[i % 3]} for i in range(n)]


def metric_recipe(tiny_llama_dir, tmp_path, **train):
    """Full fine-tuning of the tiny model on classification rows, best evaluation chosen by macro-F1."""
    tmp_path.mkdir(exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", intents(24))
    val = write_jsonl(tmp_path / "val.jsonl", intents(30)[24:])
    return recipe_from_dict({
        "model": {"name": str(tiny_llama_dir)}, "method": {"name": "full"},
        "data": {"train": str(data), "validation": str(val), "task": "classification", "max_length": 256},
        "train": {"seed": 3, "precision": "fp32", "max_steps": 12, "learning_rate": 0.01, "warmup_ratio": 0.0,
                  "schedule": "constant", "eval_every": 2, "micro_batch_size": 4, "keep_checkpoints": 1,
                  "select_by": "metric", **train},
        "output": {"dir": str(tmp_path / "run")}})


def metric_run(tiny_llama_dir, tmp_path, **train):
    return run(metric_recipe(tiny_llama_dir, tmp_path, **train), progress=False)


def test_select_by_metric_keeps_the_best_task_metric_as_slmtune_eval_scores_it(tiny_llama_dir, tmp_path):
    result = metric_run(tiny_llama_dir, tmp_path, max_steps=40, eval_every=8, learning_rate=3e-3)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    scores = {e["step"]: e["task/macro_f1"] for e in lines if e["event"] == "eval"}
    assert sorted(scores) == [8, 16, 24, 32, 40]
    losses = eval_losses(result.run_dir)
    best = max(scores, key=lambda step: (scores[step], -losses[step]))  # equal scores: the lower loss
    summary = result.summary
    assert summary["best_step"] == summary["result_step"] == best
    assert summary["selected_by"] == "task/macro_f1"
    assert summary["eval_metrics"]["task/macro_f1"] == scores[best]
    assert [e["metric"] for e in lines if e["event"] == "best"] == ["task/macro_f1"] * len(
        [e for e in lines if e["event"] == "best"])
    # The result's weights answer the validation rows exactly as scored during training, by `slmtune eval`.
    assert cli_main(["eval", str(result.run_dir), "--data", str(tmp_path / "val.jsonl"), "--no-progress"]) == 0
    report = json.loads((result.run_dir / "eval.json").read_text())
    assert report["metrics"]["macro_f1"] == pytest.approx(scores[best], abs=1e-9)


SCRIPTED = [0.2, 0.7, 0.5, 0.4, 0.9, 0.9]  # macro-F1 of the evaluations at steps 2, 4, ... 12


def scripted_scores(monkeypatch):
    """The task metric of each evaluation, in order (the loop's selection, not the model, under test)."""
    values = iter(SCRIPTED)
    monkeypatch.setattr(train_run, "score_rows", lambda *a, **k: {"macro_f1": next(values), "accuracy": 0.0, "n": 6})


def test_select_by_metric_takes_the_highest_and_early_stopping_follows_it(tiny_llama_dir, tmp_path,
                                                                                 monkeypatch):
    scripted_scores(monkeypatch)
    result = metric_run(tiny_llama_dir, tmp_path / "a")
    summary, losses = result.summary, eval_losses(result.run_dir)
    tied = 10 if losses[10] <= losses[12] else 12  # 0.9 at both: the lower validation loss wins the tie
    assert summary["best_step"] == summary["result_step"] == tied and summary["steps"] == 12
    assert summary["selected_by"] == "task/macro_f1"
    scripted_scores(monkeypatch)
    stopped = metric_run(tiny_llama_dir, tmp_path / "b", early_stopping_patience=2)
    assert stopped.summary["stopped_early"] and stopped.summary["steps"] == 8
    assert stopped.summary["result_step"] == 4  # 0.7; the lower loss elsewhere does not matter
    lines = (stopped.run_dir / "metrics.jsonl").read_text()
    assert "validation macro_f1 has not improved for 2 evaluations (best 0.7000 at step 4)" in lines


def test_select_by_metric_scores_the_same_bounded_sample_of_a_large_validation_set(tiny_llama_dir, tmp_path,
                                                                                  monkeypatch):
    seen = []

    def record(model, tokenizer, task, rows, context, **kwargs):
        seen.append([row["text"] for row in rows])
        return {"macro_f1": 0.5, "accuracy": 0.5, "n": len(rows)}

    monkeypatch.setattr(train_run, "score_rows", record)
    monkeypatch.setattr(auto, "SCORED_VALIDATION_ROWS", 4)  # of the 6 validation rows
    metric_run(tiny_llama_dir, tmp_path, max_steps=6)
    assert len(seen) == 3 and all(rows == seen[0] for rows in seen) and len(seen[0]) == 4


def test_a_resumed_run_that_selects_by_another_measure_chooses_its_best_again(tiny_llama_dir, tmp_path,
                                                                              monkeypatch):
    """The checkpoint chose its best by validation loss; the resumed run selects by macro-F1, which
    does not compare with a loss: the best comes from the evaluations after the resume only."""
    class Crash(Exception):
        pass

    def crash_at_step_6(event):
        if isinstance(event, events.Checkpoint) and event.step == 6:
            raise Crash

    with pytest.raises(Crash):
        run(metric_recipe(tiny_llama_dir, tmp_path, select_by="loss", save_every=6), on_event=crash_at_step_6,
            progress=False)
    scripted_scores(monkeypatch)  # the evaluations at steps 8, 10, 12 score 0.2, 0.7, 0.5
    result = run(metric_recipe(tiny_llama_dir, tmp_path, save_every=6), resume=True, progress=False)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("chose its best evaluation by eval_loss, this run by task/macro_f1" in e.get("message", "")
               for e in lines)
    assert [e["step"] for e in lines if e["event"] == "best" and e["metric"] == "task/macro_f1"] == [8, 10]
    summary = result.summary
    assert summary["selected_by"] == "task/macro_f1" and summary["best_step"] == summary["result_step"] == 10
    assert summary["eval_metrics"]["task/macro_f1"] == 0.7


@pytest.mark.parametrize("data, train, message", [
    ({}, {}, "set data.task"),
    ({"task": "domain"}, {}, "not domain"),
    ({"task": "classification"}, {"objective": "dpo"}, "objective sft"),
    ({"task": "classification"}, {"distributed": "ddp"}, "strategy none"),
])
def test_select_by_metric_needs_a_generated_task_metric_in_one_process(data, train, message):
    from slmtune.config import RecipeError
    with pytest.raises((RecipeError, ValueError), match=message):
        recipe_from_dict({"model": "m", "data": {"train": "t.jsonl", **data}, "output": {"dir": "o"},
                          "train": {"select_by": "metric", **train}})


@pytest.mark.parametrize("budget", [3.0])
def test_a_time_budget_ends_the_run_near_it(tiny_llama_dir, tmp_path, budget):
    data = write_jsonl(tmp_path / "train.jsonl", facts(40))
    recipe = tiny_recipe(tiny_llama_dir, data, tmp_path / "run", time_budget=f"{budget}s", micro_batch_size=2,
                         gradient_accumulation_steps=1, num_threads=1)
    result = run(recipe, progress=False)
    assert result.summary["loop_seconds"] == pytest.approx(budget, rel=0.2)
    assert result.summary["steps"] == result.summary["planned_steps"] > auto.eval_every(1)
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "warning" and "time budget" in e["message"] for e in lines)


def test_a_time_budget_plans_after_calibration_and_once_more_at_half_time():
    """The planning itself, on given times: the end-to-end run above checks it against a clock."""
    budget = TimeBudget(10.0)
    assert not budget.replan_due(2, 1.0)  # still calibrating
    assert budget.replan_due(3, 1.5) and budget.plan(3, 1.5) == 3 + 17  # 0.5 s a step, 8.5 s left
    assert not budget.replan_due(9, 4.9) and budget.replan_due(9, 5.0)  # half the budget
    assert budget.plan(10, 7.5) == 10 + 3  # the machine slowed to 0.75 s a step: 2.5 s left
    assert not budget.replan_due(12, 9.0)  # planned twice: no more
    late = TimeBudget(1.0)
    late.plan(3, 1.5)
    assert late.plan(4, 2.0) == 5  # over budget already: one more step, never fewer than done


def test_durations_parse_and_bad_ones_are_clear():
    from slmtune.config import RecipeError, parse_duration

    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    with pytest.raises(RecipeError, match="time_budget"):
        recipe_from_dict({"model": {"name": "m"}, "data": {"train": "t"}, "output": {"dir": "o"},
                          "train": {"time_budget": "soon"}})


def test_plan_estimates_a_recipes_time_from_real_steps(tiny_llama_dir, tmp_path, capsys):
    """`slmtune plan --recipe`: the data counted as the run counts it ("auto" epochs resolved), the
    speed measured over real steps of that recipe."""
    from slmtune.training.plan import estimate_time

    data = write_jsonl(tmp_path / "train.jsonl", facts(40))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {tiny_llama_dir}}}\ndata: {{train: {data}, max_length: 64}}\n"
                      f"train: {{precision: fp32, num_threads: 1}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    estimate = estimate_time(str(recipe), probe_steps=2)
    assert estimate.examples == 40 and estimate.held_out == 0 and estimate.epochs == auto.epochs(40) == 10
    assert estimate.tokens_per_epoch > 40 * 10 and estimate.tokens_per_second > 0 and estimate.probe_steps == 2
    assert estimate.train_seconds == pytest.approx(10 * estimate.tokens_per_epoch / estimate.tokens_per_second)
    assert cli_main(["plan", "--recipe", str(recipe), "--hardware", "cpu:8GB", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "Time: 40 training examples" in out and "minutes of training" in out


@pytest.mark.slow
@pytest.mark.acceptance
def test_the_shipped_classification_recipe_learns_a_users_intents(tmp_path, monkeypatch, machine_threads):
    """The #22 promise: recipes/classification/lora.yaml with only its data path changed (no
    validation file: the held-out split) trains SmolLM2-135M-Instruct on examples/intents (8 labels,
    288 rows) to >= 0.9 accuracy on 96 rows phrased differently (docs/benchmarks.md, "The auto rule").
    The target is at the edge: 0.906 at seed 42 on three bf16 machines with their 2 threads (0.896
    twice on one thread), 0.885 in fp32 on an AVX2 one, seeds 1 and 2 0.917 and 0.906; a run under
    0.9 fails this test. It trains with the machine's threads, as the command line does (the
    suite's other tests use one)."""
    monkeypatch.setenv("SLMTUNE_HOME", str(real_home()))
    models.pull("smollm2-135m-instruct")
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "classification" / "lora.yaml",
                         ["data.train=examples/intents/train.jsonl", "data.validation=null",
                          f"output.dir={tmp_path / 'run'}"])
    result = run(recipe, progress=False)
    assert result.summary["held_out_examples"] == 32 and result.summary["threads"] == machine_threads
    metrics = evaluate(str(result.run_dir), "examples/intents/test.jsonl", progress=False).report["metrics"]
    print(f"intents: accuracy {metrics['accuracy']:.3f} on {metrics['n']} test rows; "
          f"{result.summary['steps']} steps, result step {result.summary['result_step']}")
    assert metrics["accuracy"] >= 0.9
