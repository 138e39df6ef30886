"""Graders: OpenAI's reinforcement fine-tuning graders, scoring a sampled answer from 0 to 1.

    from slmtune.graders import check_grader, grade
    grader = {"type": "string_check", "name": "exact", "operation": "eq",
              "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    check_grader(grader)                                  # GraderError naming the field, else None
    result = grade(grader, "Paris", {"answer": "Paris"})  # result.reward == 1.0

Types (semantics as OpenAI's graders guide documents them):
  string_check      `operation` eq | ne (exact, case-sensitive), like (contains), ilike (contains,
                    ignoring case) of `input` against `reference`: 1 or 0
  text_similarity   `evaluation_metric` fuzzy_match (rapidfuzz's ratio), bleu (sacrebleu's sentence
                    BLEU), gleu, meteor (nltk; without WordNet's data, exact and stem matches only),
                    rouge_1 .. rouge_5, rouge_l (rouge-score's F-measure): a score in [0, 1];
                    cosine needs an embedding model, which this server has none of (a GraderError)
  python            `source` defines `grade(sample, item) -> float`, run in a sandboxed subprocess
                    (slmtune/grader_sandbox.py); refused unless the caller allows python graders
  score_model       `input` messages (templated) sent to a model through the caller's `ask`
                    function; the first number in its answer, clamped to `range` (default [0, 1])
  multi             `graders`: name -> grader; `calculate_output`: a formula over those names
                    (numbers, + - * /, parentheses, min, max, abs; parsed here, never eval'd)

Templates: `{{item.field}}` (nested with dots), `{{sample.output_text}}`, `{{sample.output_json.key}}`
(when the sample is a JSON object). A grader's errors go to `GradeResult.errors` with OpenAI's
names (sample_parse_error, invalid_variable_error, formula_parse_error, python_grader_runtime_error,
model_grader_parse_error, ...), and its reward is then 0, as OpenAI's /graders/run reports it.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from nltk.corpus import wordnet
from nltk.translate.gleu_score import sentence_gleu
from nltk.translate.meteor_score import meteor_score
from rapidfuzz import fuzz
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")
STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "cosine") + tuple(f"rouge_{n}" for n in "12345l")
FORMULA_FUNCTIONS = {"min": min, "max": max, "abs": abs}
MAX_FORMULA_CHARS = 1000
MAX_DEPTH = 4  # multi graders nested in multi graders

ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error")


class GraderError(ValueError):
    """A grader that cannot run: `param` names the field (e.g. grader.graders.exact.operation)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class GradeResult:
    reward: float
    sub_rewards: dict[str, float] = field(default_factory=dict)
    errors: dict[str, Any] = field(default_factory=dict)  # OpenAI's flags; only the raised ones
    execution_time: float = 0.0

    def metadata(self, grader: dict) -> dict:
        """OpenAI's /graders/run `metadata`: name, type, every error flag, timing, scores."""
        errors = {flag: bool(self.errors.get(flag)) for flag in ERROR_FLAGS}
        errors |= {k: v for k, v in self.errors.items() if k not in ERROR_FLAGS}  # *_details, *_type
        return {"name": grader.get("name", ""), "type": grader.get("type", ""), "errors": errors,
                "execution_time": self.execution_time, "scores": self.sub_rewards, "token_usage": None,
                "sampled_model_name": None}


class GradingFailed(Exception):
    """Raised inside grading; becomes an error flag of the result (reward 0)."""

    def __init__(self, flag: str, details: str = ""):
        super().__init__(details or flag)
        self.flag = flag
        self.details = details


# --- templates ---------------------------------------------------------------------------------
TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w]*(?:\.[\w-]+)*)\s*\}\}")


def template_fields(text: Any) -> list[str]:
    """The variables a template names, e.g. ["item.answer", "sample.output_text"]."""
    return TEMPLATE.findall(text) if isinstance(text, str) else []


def item_fields(grader: dict) -> set[str]:
    """The top-level item fields every row must have for this grader (from its templates)."""
    names = set()
    for text in _templates(grader):
        for variable in template_fields(text):
            parts = variable.split(".")
            if parts[0] == "item" and len(parts) > 1:
                names.add(parts[1])
    return names


def _templates(grader: dict) -> list[str]:
    kind = grader.get("type")
    if kind in ("string_check", "text_similarity"):
        return [grader.get("input", ""), grader.get("reference", "")]
    if kind == "score_model":
        return [_content_text(m) for m in grader.get("input") or [] if isinstance(m, dict)]
    if kind == "multi":
        return [t for g in (grader.get("graders") or {}).values() if isinstance(g, dict) for t in _templates(g)]
    return []


def _content_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def sample_namespace(output_text: str) -> dict:
    sample: dict = {"output_text": output_text}
    try:
        value = json.loads(output_text)
    except (json.JSONDecodeError, RecursionError):
        value = None
    if isinstance(value, dict):
        sample["output_json"] = value
    return sample


def render(text: str, sample: dict, item: dict) -> str:
    """Fill a template's variables; a variable that names nothing raises invalid_variable_error."""
    namespaces = {"sample": sample, "item": item}

    def value_of(match: re.Match) -> str:
        parts = match.group(1).split(".")
        if parts[0] not in namespaces:
            raise GradingFailed("invalid_variable_error", f"{match.group(1)}: the namespaces are item and sample")
        value: Any = namespaces[parts[0]]
        for part in parts[1:]:
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                flag = "sample_parse_error" if parts[:2] == ["sample", "output_json"] else "invalid_variable_error"
                raise GradingFailed(flag, f"{match.group(1)} names nothing in this {parts[0]}")
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return TEMPLATE.sub(value_of, text)


# --- checking a grader ---------------------------------------------------------------------------
def check_grader(grader: Any, param: str = "grader", depth: int = 0, *, python_allowed: bool = True,
                 model_names: set[str] | None = None) -> None:
    """Raise GraderError (with the field's path) for a grader that cannot run here."""
    if not isinstance(grader, dict):
        raise GraderError("a grader must be an object", param)
    kind = grader.get("type")
    if kind not in GRADER_TYPES:
        raise GraderError(f"type {kind!r} is not a grader type; expected one of {', '.join(GRADER_TYPES)}",
                          f"{param}.type")
    if not isinstance(grader.get("name", ""), str):
        raise GraderError("name must be a string", f"{param}.name")
    required = {"string_check": ("input", "reference", "operation"),
                "text_similarity": ("input", "reference", "evaluation_metric"),
                "python": ("source",), "score_model": ("input", "model"),
                "multi": ("graders", "calculate_output")}[kind]
    for key in required:
        if key not in grader:
            raise GraderError(f"a {kind} grader needs `{key}`", f"{param}.{key}")
    for key in ("input", "reference"):
        if kind in ("string_check", "text_similarity") and not isinstance(grader[key], str):
            raise GraderError(f"`{key}` must be a string (a template)", f"{param}.{key}")
    if kind == "string_check" and grader["operation"] not in STRING_OPERATIONS:
        raise GraderError(f"operation must be one of {', '.join(STRING_OPERATIONS)}", f"{param}.operation")
    if kind == "text_similarity":
        metric = grader["evaluation_metric"]
        if metric not in SIMILARITY_METRICS:
            raise GraderError(f"evaluation_metric must be one of {', '.join(SIMILARITY_METRICS)}",
                              f"{param}.evaluation_metric")
        if metric == "cosine":
            raise GraderError("cosine similarity needs an embedding model, and this server has none configured; "
                              "use fuzzy_match, bleu, gleu, meteor or rouge_*", f"{param}.evaluation_metric")
        threshold = grader.get("pass_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0 <= threshold <= 1):
            raise GraderError("pass_threshold must be a number from 0 to 1", f"{param}.pass_threshold")
    if kind == "python":
        if not python_allowed:
            raise GraderError("python graders are disabled on this server; its operator can allow them with "
                              "`slmtune api --allow-python-graders` (they run in a sandboxed subprocess)",
                              f"{param}.type")
        if not isinstance(grader["source"], str) or not re.search(r"^def grade\s*\(", grader["source"], re.M):
            raise GraderError("source must define `def grade(sample, item)`", f"{param}.source")
    if kind == "score_model":
        if not isinstance(grader["input"], list) or not grader["input"] or \
                not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in grader["input"]):
            raise GraderError("input must be a non-empty list of messages", f"{param}.input")
        if model_names is not None and grader["model"] not in model_names:
            raise GraderError(f"model {grader['model']!r} is not served here; offered: {', '.join(sorted(model_names))}",
                              f"{param}.model")
        low, high = score_range(grader)
        if not low < high:
            raise GraderError("range must be [low, high] with low < high", f"{param}.range")
        params = grader.get("sampling_params")
        if params is not None:
            try:
                judge_sampling(params)
            except (TypeError, ValueError) as err:
                raise GraderError(str(err), f"{param}.sampling_params") from None
    if kind == "multi":
        if depth >= MAX_DEPTH:
            raise GraderError(f"multi graders nest at most {MAX_DEPTH} deep", param)
        graders = grader["graders"]
        if not isinstance(graders, dict) or not graders:
            raise GraderError("graders must be a non-empty object: name -> grader", f"{param}.graders")
        for name, sub in graders.items():
            if not re.fullmatch(r"[A-Za-z_]\w*", name) or name in FORMULA_FUNCTIONS:
                raise GraderError(f"grader name {name!r} must be an identifier (and not min, max or abs): the "
                                  "formula refers to it", f"{param}.graders")
            check_grader(sub, f"{param}.graders.{name}", depth + 1, python_allowed=python_allowed,
                         model_names=model_names)
        try:
            parse_formula(grader["calculate_output"], set(graders))
        except GradingFailed as err:
            raise GraderError(f"calculate_output: {err.details}", f"{param}.calculate_output") from None


JUDGE_MAX_TOKENS = 64  # the longest answer a score_model grader's model may give (it only has to name a score)


def judge_sampling(params: Any) -> tuple[int, float, int | None]:
    """(max_tokens, temperature, seed) of a score_model grader's `sampling_params`: its
    max_completions_tokens clamped to JUDGE_MAX_TOKENS (a grader asks for a score, and a tenant's
    grader must not make a worker decode for hours), temperature 0 and no seed by default."""
    params = params or {}
    if not isinstance(params, dict):
        raise TypeError("sampling_params must be an object")
    budget, temperature, seed = (params.get("max_completions_tokens"), params.get("temperature", 0.0),
                                 params.get("seed"))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError("max_completions_tokens must be a positive integer")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError("temperature must be a number from 0 to 2")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError("seed must be a non-negative integer")
    return min(budget or JUDGE_MAX_TOKENS, JUDGE_MAX_TOKENS), float(temperature), seed


def score_range(grader: dict) -> tuple[float, float]:
    value = grader.get("range", [0, 1])
    if not isinstance(value, list) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return 0.0, 0.0
    return float(value[0]), float(value[1])


# --- the formula of a multi grader -----------------------------------------------------------------
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def parse_formula(text: Any, names: set[str]) -> ast.Expression:
    """The formula's syntax tree, if it is arithmetic over `names` only; else formula_parse_error."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_FORMULA_CHARS:
        raise GradingFailed("formula_parse_error", f"a formula of 1 to {MAX_FORMULA_CHARS} characters is needed")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise GradingFailed("formula_parse_error", f"{text!r} is not a formula") from None
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.Load)) or type(node) in BINARY or type(node) in UNARY:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY or isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            continue
        if isinstance(node, ast.Name) and (node.id in names or id(node) in called and node.id in FORMULA_FUNCTIONS):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORMULA_FUNCTIONS \
                and not node.keywords and node.args:
            continue
        shown = ast.get_source_segment(text.strip(), node) or type(node).__name__
        raise GradingFailed("formula_parse_error", f"{shown!r} is not allowed: use numbers, + - * /, parentheses, "
                                                   f"min, max, abs and the graders' names ({', '.join(sorted(names))})")
    return tree


def evaluate_formula(tree: ast.Expression, values: dict[str, float]) -> float:
    def value(node) -> float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in values:  # a function's name used as a value
                raise GradingFailed("formula_parse_error", f"{node.id} is not a grader's name")
            return values[node.id]
        if isinstance(node, ast.BinOp):
            return BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp):
            return UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call):
            return float(FORMULA_FUNCTIONS[node.func.id](*[value(a) for a in node.args]))
        raise GradingFailed("formula_parse_error", type(node).__name__)

    try:
        result = value(tree)
    except ZeroDivisionError:
        raise GradingFailed("formula_parse_error", "division by zero") from None
    if not math.isfinite(result):
        raise GradingFailed("formula_parse_error", "the formula's value is not finite")
    return result


# --- grading --------------------------------------------------------------------------------------
ROUGE_KEYS = {f"rouge_{n}": f"rouge{n}" for n in "12345"} | {"rouge_l": "rougeL"}
_BLEU = BLEU(effective_order=True)  # sentence-level BLEU: missing higher n-grams do not zero it


def similarity(metric: str, text: str, reference: str) -> float:
    if metric == "fuzzy_match":
        return fuzz.ratio(text, reference) / 100.0
    if metric == "bleu":
        return _BLEU.sentence_score(text, [reference]).score / 100.0
    if metric == "gleu":
        return float(sentence_gleu([reference.split()], text.split()))
    if metric == "meteor":
        return float(meteor_score([reference.split()], text.split(), wordnet=synonyms()))
    if metric in ROUGE_KEYS:
        key = ROUGE_KEYS[metric]
        return rouge_scorer.RougeScorer([key]).score(reference, text)[key].fmeasure
    raise GradingFailed("other_error", f"evaluation_metric {metric!r} is not available")


class NoSynonyms:
    """Stands in for WordNet when its data is not installed (it is not on PyPI; `python -m
    nltk.downloader wordnet` fetches it): METEOR then matches exact words and stems only."""

    def synsets(self, *args, **kwargs) -> list:
        return []


@functools.lru_cache(maxsize=1)
def synonyms():
    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        return NoSynonyms()


FIRST_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
Ask = Callable[[str, list[dict], dict], str]  # (model, messages, sampling_params) -> answer text
RunPython = Callable[[str, dict, dict], float]  # (source, sample, item) -> score


def _score(grader: dict, sample: dict, item: dict, ask: Ask | None, run_python: RunPython | None,
           sub_rewards: dict[str, float]) -> float:
    kind = grader["type"]
    if kind == "string_check":
        text, reference = render(grader["input"], sample, item), render(grader["reference"], sample, item)
        operation = grader["operation"]
        hit = {"eq": text == reference, "ne": text != reference, "like": reference in text,
               "ilike": reference.lower() in text.lower()}[operation]
        return 1.0 if hit else 0.0
    if kind == "text_similarity":
        text, reference = render(grader["input"], sample, item), render(grader["reference"], sample, item)
        return similarity(grader["evaluation_metric"], text, reference)
    if kind == "python":
        if run_python is None:
            raise GradingFailed("python_grader_server_error", "python graders are not enabled here")
        return run_python(grader["source"], sample, item)
    if kind == "score_model":
        if ask is None:
            raise GradingFailed("model_grader_server_error", "no model is available to score with")
        messages = [{"role": m["role"], "content": render(_content_text(m), sample, item)} for m in grader["input"]]
        try:
            answer = ask(grader["model"], messages, dict(grader.get("sampling_params") or {}))
        except Exception as err:  # noqa: BLE001 - whatever the scoring model's server did
            raise GradingFailed("model_grader_server_error", str(err)[:500]) from None
        found = FIRST_NUMBER.search(answer or "")
        if found is None:
            raise GradingFailed("model_grader_parse_error", f"no score in the model's answer {answer[:200]!r}")
        low, high = score_range(grader)
        return min(high, max(low, float(found.group())))
    # multi: every sub-grader, then the formula over their scores
    values = {}
    for name, sub in grader["graders"].items():
        values[name] = _score(sub, sample, item, ask, run_python, sub_rewards)
        sub_rewards[name] = values[name]
    return evaluate_formula(parse_formula(grader["calculate_output"], set(values)), values)


def grade(grader: dict, output_text: str, item: dict | None = None, *, ask: Ask | None = None,
          run_python: RunPython | None = None) -> GradeResult:
    """Score one sampled answer for one data row. Never raises for the sample's or the grader's
    runtime failures: they are the result's error flags, with reward 0."""
    started = time.perf_counter()
    sub_rewards: dict[str, float] = {}
    try:
        reward = _score(grader, sample_namespace(output_text), item or {}, ask, run_python, sub_rewards)
        errors: dict[str, Any] = {}
    except GradingFailed as failure:
        reward, errors = 0.0, {failure.flag: True}
        if failure.details:
            errors[f"{failure.flag}_details"] = failure.details
    return GradeResult(float(reward), sub_rewards, errors, round(time.perf_counter() - started, 6))
