"""`slmtune <verb>`: parse arguments and call one function per verb.

    slmtune train recipes/quickstart/support_assistant.yaml train.epochs=2
    slmtune train --model smollm2-135m-instruct --data train.jsonl --epochs 3 --output runs/mine
    slmtune train --resume runs/mine
    slmtune models pull smollm2-135m-instruct | slmtune models list
    slmtune data validate train.jsonl [--model smollm2-135m-instruct]
    slmtune chat runs/mine [--prompt TEXT] [--system TEXT]
    slmtune export runs/mine --merge exports/mine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def _user_errors():
    from slmtune.config import RecipeError
    from slmtune.data.formats import DataError
    from slmtune.data.tokenize import TemplateError
    from slmtune.models import ModelError

    return (RecipeError, DataError, TemplateError, ModelError)


def cmd_train(args) -> int:
    from slmtune.config import RecipeError, apply_overrides, load_recipe, recipe_from_dict
    from slmtune.run import run

    quick = {"model": args.model, "data": args.data, "validation": args.validation, "method": args.method,
             "epochs": args.epochs, "output": args.output}
    if args.resume:
        if args.recipe or any(v is not None for v in quick.values()):
            raise RecipeError("--resume RUN_DIR takes the run's own recipe.yaml; give only key=value overrides")
        recipe = load_recipe(Path(args.resume) / "recipe.yaml", args.overrides)
    elif args.recipe and "=" not in args.recipe:
        if any(v is not None for v in quick.values()):
            raise RecipeError("give a recipe file or the quick flags (--model/--data/...), not both; "
                              "override recipe values with key.sub=value")
        recipe = load_recipe(args.recipe, args.overrides)
    else:
        overrides = ([args.recipe] if args.recipe else []) + args.overrides
        if not args.model or not args.data:
            raise RecipeError("slmtune train needs a recipe file, or at least --model and --data")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        raw = {
            "model": {"name": args.model},
            "method": {"name": args.method or "lora"},
            "data": {"train": args.data} | ({"validation": args.validation} if args.validation else {}),
            "train": {"epochs": args.epochs} if args.epochs is not None else {},
            "output": {"dir": args.output or f"runs/{Path(args.model).name}-{args.method or 'lora'}-{stamp}"},
        }
        recipe = recipe_from_dict(apply_overrides(raw, overrides), "command line")

    on_event = None
    if args.json_events:
        def on_event(event):
            print(json.dumps(event), flush=True)

    result = run(recipe, resume=bool(args.resume), on_event=on_event, progress=not args.no_progress)
    s = result.summary
    print(f"Done: {result.run_dir}  (loss {s['final_train_loss']:.4f}"
          + (f", eval_loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else "")
          + f", {s['tokens_per_second']} tokens/s, peak RSS {s['peak_rss_mb']:.0f} MB)", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from slmtune import models

    if args.models_verb == "pull":
        print(models.pull(args.name))
        return 0
    local = dict(models.list_local())
    for name, entry in models.CATALOG.items():
        where = str(local[name]) if name in local else "not pulled (slmtune models pull " + name + ")"
        print(f"{name:28} {where}\n{'':28} {entry.description}")
    for name, path in local.items():
        if name not in models.CATALOG:
            print(f"{name:28} {path}")
    return 0


def cmd_data(args) -> int:
    from slmtune.data.validate import validate_file

    tokenizer = None
    if args.model:
        from slmtune.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    report = validate_file(args.file, fmt=args.format, tokenizer=tokenizer, max_length=args.max_length)
    for issue in report.issues:
        print(issue)
    summary = f"{args.file}: {report.n_examples} valid example(s), format {report.format or 'unknown'}"
    if tokenizer is not None:
        summary += f", {report.total_tokens} tokens, {report.tokens_cut} would be cut at max_length {args.max_length}"
    summary += f"; {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    print(summary)
    return 1 if report.errors else 0


def cmd_chat(args) -> int:
    from slmtune.chat import chat

    chat(args.target, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature)
    return 0


def cmd_export(args) -> int:
    from slmtune.export import merge

    print(merge(args.run_dir, args.merge))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmtune", description="Fine-tune and serve small language models.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("train", help="fine-tune from a recipe or quick flags")
    p.add_argument("recipe", nargs="?", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=2")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--model", help="model name, directory, .gguf file or hub id (quick mode)")
    p.add_argument("--data", help="training JSONL (quick mode)")
    p.add_argument("--validation", help="validation JSONL (quick mode)")
    p.add_argument("--method", help="fine-tuning method (quick mode; default lora)")
    p.add_argument("--epochs", type=float, help="epochs (quick mode)")
    p.add_argument("--output", help="run directory (quick mode; default runs/<model>-<method>-<time>)")
    p.add_argument("--json-events", action="store_true", help="print every training event as a JSON line on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("models", help="pull and list local models")
    mv = p.add_subparsers(dest="models_verb", required=True)
    pull = mv.add_parser("pull", help="download and convert a catalog model")
    pull.add_argument("name")
    mv.add_parser("list", help="catalog and local models")
    p.set_defaults(func=cmd_models)

    p = verbs.add_parser("data", help="check training data")
    dv = p.add_subparsers(dest="data_verb", required=True)
    val = dv.add_parser("validate", help="check a JSONL file; exit 1 on errors")
    val.add_argument("file")
    val.add_argument("--model", help="also tokenize with this model and report lengths")
    val.add_argument("--max-length", type=int, default=1024)
    val.add_argument("--format", default="auto", choices=["auto", "chat", "prompt_completion", "text"])
    p.set_defaults(func=cmd_data)

    p = verbs.add_parser("export", help="write a run as a standalone model")
    p.add_argument("run_dir")
    p.add_argument("--merge", metavar="OUT", required=True, help="folder for the merged HF model")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("chat", help="chat with a model or a fine-tuned run")
    p.add_argument("target", help="run directory or model")
    p.add_argument("--prompt", help="one message; without it, chat interactively")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Deprecation notices from transformers/peft internals are for us, not for users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from slmtune.train import TrainingStopped

        if not isinstance(err, TrainingStopped):
            raise
        print(f"{err}; continue with: slmtune train --resume {args.output or args.resume or args.recipe}",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
