"""`slmtune <verb>`: parse arguments and call one function per verb.

    slmtune train recipes/quickstart/support_assistant.yaml train.epochs=2
    slmtune train --model smollm2-135m-instruct --data train.jsonl --epochs 3 --output runs/mine
    slmtune train --resume runs/mine
    slmtune train recipe.yaml train.distributed.strategy=fsdp --nproc 2 [--nnodes 2 --node-rank 0 --master-addr HOST]
    slmtune models pull smollm2-135m-instruct | slmtune models list
    slmtune data validate train.jsonl [--model smollm2-135m-instruct] [--task ner]
    slmtune data convert --from alpaca|sharegpt|csv|hf-datasets IN OUT [--task T] [--map FIELD=COLUMN]
    slmtune eval runs/mine --data test.jsonl [--task T] [--limit N] [--batch-size B] [--output eval.json]
    slmtune grade --grader g.json --data prompts.jsonl --model NAME_OR_RUN   # a grader's mean reward
    slmtune chat runs/mine [--prompt TEXT] [--system TEXT]
    slmtune serve --model smollm2-135m-instruct --adapter support=runs/mine [--port 8000]
    slmtune adapters add|remove|list [NAME [RUN_DIR]] --url http://127.0.0.1:8000
    slmtune export runs/mine --merge exports/mine
    slmtune export runs/mine --format onnx [--precision fp32|int8|int4] --output exports/mine-onnx
    slmtune export runs/mine --format onnx-base|onnx-adapter [--base-onnx BASE] --output OUT   # shared base
    slmtune export runs/mine --format gguf [--quant f16|q8_0|q4_0|...] --output exports/mine-gguf
    slmtune export runs/mine --format gguf-lora [--base-gguf base.gguf] --output exports/mine-lora
    slmtune export runs/mine --format kaito [--kaito-image REF] --output exports/mine-kaito
    slmtune serve --backend onnx --model exports/mine-onnx
    slmtune serve --backend onnx --model exports/base-onnx --adapter mine=exports/mine-onnx-adapter
    slmtune serve --backend llamacpp --model exports/mine-gguf/model.gguf
    slmtune plot runs/a [runs/b ...] [--output curves.png]
    slmtune plan --model qwen2.5-1.5b --hardware 1x24GB --seq-len 2048 [--measure]
    slmtune api [--db URL] [--workers N] [--models NAME=DIR] [--port 8000]   # the fine-tuning service
    slmtune worker --db URL | slmtune keys create --tenant NAME [--db URL]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import warnings
from pathlib import Path

from slmtune.serve import DEFAULT_MAX_TOKENS_PER_OWNER  # light, as the next one
from slmtune.tasks import TASK_NAMES  # light (no torch): keeps `slmtune --help` fast


def _user_errors():
    from slmtune.config import RecipeError
    from slmtune.data.formats import DataError
    from slmtune.data.tokenize import TemplateError
    from slmtune.models import ModelError

    return (RecipeError, DataError, TemplateError, ModelError)


def epochs_arg(text: str):
    """--epochs: a positive number, or auto."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of epochs, or auto") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: epochs must be more than 0")
    return value


def cmd_train(args) -> int:
    from slmtune.config import RecipeError, apply_overrides, load_recipe, recipe_from_dict

    quick = {"model": args.model, "data": args.data, "validation": args.validation, "method": args.method,
             "epochs": args.epochs, "output": args.output}
    # --objective is a shorthand for train.objective=NAME: with a recipe file too.
    objective_override = [f"train.objective={args.objective}"] if args.objective else []
    if args.grader:  # reinforcement fine-tuning: train.objective grpo with this grader
        if args.objective not in (None, "grpo"):
            raise RecipeError(f"--grader trains with train.objective grpo, not {args.objective}")
        objective_override = ["train.objective.name=grpo", f"train.objective.grader={args.grader}"]
    if args.allow_python_graders:
        objective_override.append("train.objective.allow_python_grader=true")
    objective_override += [f"train.time_budget={args.time_budget}"] if args.time_budget else []
    if args.resume:
        first_is_override = bool(args.recipe) and "=" in args.recipe  # argparse puts the first one there
        if (args.recipe and not first_is_override) or any(v is not None for v in quick.values()):
            raise RecipeError("--resume RUN_DIR takes the run's own recipe.yaml; give only key=value overrides")
        if args.objective or args.time_budget or args.grader:
            raise RecipeError("--resume RUN_DIR continues the run's own plan; --objective, --grader and "
                              "--time-budget do not apply")
        recipe = load_recipe(Path(args.resume) / "recipe.yaml", [args.recipe] * first_is_override + args.overrides)
    elif args.recipe and "=" not in args.recipe:
        if any(v is not None for v in quick.values()):
            raise RecipeError("give a recipe file or the quick flags (--model/--data/...), not both; "
                              "override recipe values with key.sub=value")
        recipe = load_recipe(args.recipe, objective_override + args.overrides)
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
        recipe = recipe_from_dict(apply_overrides(raw, objective_override + overrides), "command line")

    if args.nproc > 1 or args.nnodes > 1:  # the recipe is valid: run this command on every process
        return _launch_train(args, recipe)
    from slmtune.training import events
    from slmtune.training.run import run

    sinks = []
    if args.json_events:
        sinks.append(lambda line: print(line, flush=True))
    if args.events_file:  # a Kubernetes Job's trainer: the worker reads this file on the shared volume
        sinks.append(lambda line: events.append_line(args.events_file, line))
    on_event = None
    if sinks:
        def on_event(event):
            line = events.to_json(event)
            for sink in sinks:
                sink(line)

    result = run(recipe, resume=bool(args.resume), on_event=on_event, progress=not args.no_progress)
    s = result.summary
    if os.environ.get("RANK", "0") != "0":  # one of several processes: rank 0 reports
        return 0
    print(f"Done: {result.run_dir}  (loss {s['final_train_loss']:.4f}"
          + (f", eval_loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else "")
          + f", {s['tokens_per_second']} tokens/s, peak RSS {s['peak_rss_mb']:.0f} MB)", file=sys.stderr)
    return 0


def _launch_train(args, recipe) -> int:
    """`slmtune train ... --nproc N`: run this same command on N processes through torchrun."""
    from slmtune.training import distributed

    distributed.check_available(recipe.train.distributed.strategy)
    argv = list(args.argv)
    if args.model and not args.output:  # every process must use the same (time-stamped) default directory
        argv += ["--output", recipe.output.dir]
    code = distributed.launch(argv, args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if code == 130:
        print(f"stopped; continue with: slmtune train --resume {recipe.output.dir} --nproc {args.nproc}",
              file=sys.stderr)
    return code


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

    if args.data_verb == "convert":
        return cmd_data_convert(args)
    tokenizer = None
    if args.model:
        from slmtune.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    grader_fields = None
    if args.grader:
        from slmtune.graders import GraderError, check_grader, item_fields

        grader = read_grader(args.grader)
        try:
            check_grader(grader)
        except GraderError as err:
            print(f"{args.grader}: error invalid_grader: {err.param}: {err}")
            return 1
        grader_fields = item_fields(grader)
    report = validate_file(args.file, fmt=args.format, tokenizer=tokenizer, max_length=args.max_length,
                           task=args.task, grader_fields=grader_fields)
    for issue in report.issues:
        print(issue)
    summary = (f"{args.file}: {report.n_examples} valid example(s), "
               + (f"task {args.task}" if args.task else f"format {report.format or 'unknown'}"))
    if tokenizer is not None:
        summary += f", {report.total_tokens} tokens, {report.tokens_cut} would be cut at max_length {args.max_length}"
    if report.unlisted_errors or report.unlisted_warnings:
        print(f"... and {report.unlisted_errors} more error(s), {report.unlisted_warnings} more warning(s) not listed")
    summary += (f"; {report.n_errors} error(s), {len(report.warnings) + report.unlisted_warnings} warning(s)")
    print(summary)
    return 1 if report.n_errors else 0


def read_grader(path: str) -> dict:
    """A grader from a JSON file (OpenAI's grader object)."""
    from slmtune.config import RecipeError

    try:
        grader = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RecipeError(f"{path}: cannot read a grader: {err}") from None
    if not isinstance(grader, dict):
        raise RecipeError(f"{path}: a grader is a JSON object")
    return grader


def cmd_data_convert(args) -> int:
    from slmtune.config import RecipeError
    from slmtune.data.convert import convert

    mapping = {}
    for item in args.map:
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise RecipeError(f"--map {item!r}: use FIELD=COLUMN")
        mapping[field.strip()] = column.strip()
    result = convert(args.source, args.input, args.output, task=args.task, mapping=mapping, split=args.split)
    print(f"{result.path}: {result.n_rows} row(s), {result.format}")
    return 0


def cmd_eval(args) -> int:
    from slmtune.evaluate import evaluate, format_table

    result = evaluate(args.target, args.data, task=args.task, limit=args.limit, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, output=args.output, progress=not args.no_progress,
                      pairs=args.pairs)
    print(format_table(result.report))
    print(f"wrote {result.path}" if result.path else "(not saved: give --output FILE)", file=sys.stderr)
    return 0


def cmd_grade(args) -> int:
    from slmtune.evaluate import grade_file
    from slmtune.graders import GraderError

    grader = read_grader(args.grader)
    try:
        result = grade_file(args.model, args.data, grader, limit=args.limit, max_new_tokens=args.max_new_tokens,
                            allow_python=args.allow_python, progress=not args.no_progress)
    except GraderError as err:
        print(f"{args.grader}: error invalid_grader: {err.param}: {err}", file=sys.stderr)
        return 1
    for sample in result["samples"][: args.show]:
        print(f"reward {sample['reward']:.3f}  {sample['prompt'][-60:]!r} -> {sample['answer'][:80]!r}"
              + (f"  {sample['sub_rewards']}" if sample["sub_rewards"] else "")
              + (f"  errors {sample['errors']}" if sample["errors"] else ""))
    errors = ", ".join(f"{k} x{v}" for k, v in result["errors"].items()) or "none"
    print(f"{result['grader']} on {result['n']} rows of {args.data}, answered by {args.model}: "
          f"mean reward {result['mean_reward']:.4f}; errors: {errors}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


def cmd_chat(args) -> int:
    from slmtune.chat import chat

    chat(args.target, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature)
    return 0


GRACEFUL_SHUTDOWN_SECONDS = 5


def warn_if_exposed(host: str) -> None:
    """A server bound beyond loopback answers the network: say so."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: reachable from other machines; put TLS and a firewall in front "
              "(see README, Limits and safe defaults)", file=sys.stderr)


def cmd_serve(args) -> int:
    import os

    import uvicorn

    from slmtune.serve.adapters import AdapterError
    from slmtune.serve.app import create_app
    from slmtune.serve.engine import Engine

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"error: --adapter {item!r}: use NAME=RUN_DIR", file=sys.stderr)
            return 2
        adapters[name] = path
    if min(args.max_loaded_adapters, args.max_batch_size, args.default_max_tokens, args.max_tokens_per_client) < 1:
        print("error: --max-loaded-adapters, --max-batch-size, --default-max-tokens and --max-tokens-per-client "
              "must be at least 1", file=sys.stderr)
        return 2
    batching = dict(max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    default_max_tokens=args.default_max_tokens, continuous_batching=args.continuous_batching,
                    max_tokens_per_owner=args.max_tokens_per_client)
    try:
        if args.backend == "llamacpp":
            from slmtune.serve.llamacpp_engine import LlamaCppEngine

            engine = LlamaCppEngine.load(args.model, adapters, base_name=args.served_model_name,
                                         max_loaded_adapters=args.max_loaded_adapters, **batching)
        elif args.backend == "onnx":
            from slmtune.serve.onnx_engine import OnnxEngine

            engine = OnnxEngine.load(args.model, adapters, base_name=args.served_model_name,
                                     max_loaded_adapters=args.max_loaded_adapters, **batching)
        else:
            engine = Engine.load(args.model, adapters, base_name=args.served_model_name, dtype=args.dtype,
                                 max_loaded_adapters=args.max_loaded_adapters, **batching)
    except AdapterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    token = args.admin_token or os.environ.get("SLMTUNE_ADMIN_TOKEN") or None
    if token is None:  # admin routes register adapters from server paths: never open by default
        token = secrets.token_urlsafe(24)
        print(f"Admin token for /admin (this run only; set --admin-token or $SLMTUNE_ADMIN_TOKEN to choose one): "
              f"{token}", file=sys.stderr)
    warn_if_exposed(args.host)
    print(f"Serving {', '.join(engine.model_names())} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(engine, admin_token=token), host=args.host, port=args.port, log_level=args.log_level,
                # SIGTERM: stop within seconds (Kubernetes, systemd); in-flight generations are cancelled.
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    return 0


def cmd_adapters(args) -> int:
    import os

    from slmtune.serve.client import AdminClient, ClientError

    client = AdminClient(args.url, token=args.admin_token or os.environ.get("SLMTUNE_ADMIN_TOKEN") or None)
    try:
        if args.adapters_verb == "add":
            # The server opens the path, so send it absolute: relative to where this command runs.
            added = client.add(args.name, str(Path(args.path).expanduser().resolve()))
            print(f"registered {added['name']} -> {added['path']}")
        elif args.adapters_verb == "remove":
            client.remove(args.name)
            print(f"removed {args.name}")
        else:
            for entry in client.list():
                print(f"{entry['name']:24} {'loaded' if entry['loaded'] else '':7} {entry['path']}")
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from slmtune.config import RecipeError
    from slmtune.export.merged import merge

    fmt = args.format or "merged"
    if args.merge and args.output:
        raise RecipeError("give the output folder once: --output OUT (or --merge OUT for the merged format)")
    if args.merge and fmt != "merged":
        raise RecipeError("--merge OUT writes the merged format; use --output OUT with --format onnx")
    out = args.merge or args.output
    if not out:
        raise RecipeError("slmtune export needs --output OUT (or --merge OUT)")
    if fmt == "merged" and args.precision != "fp32":
        raise RecipeError("--precision int8/int4 applies to --format onnx; the merged model is fp32 safetensors")
    if fmt == "merged" and args.builder_option:
        raise RecipeError("--builder-option applies to --format onnx")
    from slmtune.export.parity import format_parity

    if fmt != "gguf" and args.quant:
        raise RecipeError("--quant applies to --format gguf (ONNX takes --precision; a GGUF LoRA is f32)")
    if fmt != "gguf-lora" and args.base_gguf:
        raise RecipeError("--base-gguf applies to --format gguf-lora")
    if fmt.startswith("gguf") and (args.precision != "fp32" or args.builder_option):
        raise RecipeError("--precision/--builder-option apply to --format onnx; GGUF takes --quant")
    if fmt != "kaito" and (args.kaito_preset or args.kaito_image or args.kaito_instance_type is not None):
        raise RecipeError("--kaito-preset/--kaito-image/--kaito-instance-type apply to --format kaito")
    if fmt == "kaito" and (args.precision != "fp32" or args.builder_option):
        raise RecipeError("--precision/--builder-option apply to --format onnx; --format kaito copies the adapter")
    if fmt != "onnx-adapter" and args.base_onnx:
        raise RecipeError("--base-onnx applies to --format onnx-adapter")
    if fmt == "onnx-adapter" and not args.base_onnx:
        raise RecipeError("--format onnx-adapter needs --base-onnx BASE, a `--format onnx-base` export")
    if fmt == "onnx-adapter" and (args.precision != "fp32" or args.builder_option):
        raise RecipeError("--precision/--builder-option apply to --format onnx and onnx-base; an ONNX adapter "
                          "runs at the base's precision")
    llamacpp_report = None  # GGUF: the same prompts answered by llama.cpp itself
    if fmt == "gguf":
        from slmtune.export.gguf import export_gguf

        result = export_gguf(args.run_dir, out, args.quant or "f16", check_parity=not args.no_parity)
        path, report = result.path, result.parity
        llamacpp_report = result.llamacpp_parity
    elif fmt == "gguf-lora":
        from slmtune.export.gguf import export_gguf_lora

        result = export_gguf_lora(args.run_dir, out, base_gguf=args.base_gguf, check_parity=not args.no_parity)
        path, report = result.path, None
        llamacpp_report = result.llamacpp_parity
    elif fmt == "kaito":
        from slmtune.export.kaito import DEFAULT_INSTANCE_TYPE, export_kaito

        instance = DEFAULT_INSTANCE_TYPE if args.kaito_instance_type is None else args.kaito_instance_type
        result = export_kaito(args.run_dir, out, preset=args.kaito_preset, image=args.kaito_image,
                              instance_type=instance)
        if result.image_is_placeholder:
            print(f"note: the Workspace names the placeholder image {result.image}; pass --kaito-image "
                  "REGISTRY/NAME:TAG (see README.md in the export)", file=sys.stderr)
        path, report = result.path, None
    elif fmt == "onnx-adapter":
        from slmtune.export.onnx_adapters import export_onnx_adapter

        result = export_onnx_adapter(args.run_dir, out, args.base_onnx, check_parity=not args.no_parity)
        path, report = result.path, result.parity
    elif fmt in ("onnx", "onnx-base"):
        from slmtune.export.onnx import export_onnx
        from slmtune.export.onnx_adapters import export_onnx_base

        options = {}
        for item in args.builder_option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise RecipeError(f"--builder-option {item!r}: expected KEY=VALUE, e.g. block_size=16")
            options[key] = value
        result = (export_onnx if fmt == "onnx" else export_onnx_base)(
            args.run_dir, out, args.precision, check_parity=not args.no_parity, builder_options=options)
        path, report = result.path, result.parity
    else:
        from slmtune.export.parity import TorchCandidate, parity
        from slmtune.models import load_model, load_tokenizer

        path = merge(args.run_dir, out)
        report = None
        if not args.no_parity:
            exported = TorchCandidate(load_model(str(path)).eval(), load_tokenizer(str(path)))
            report = parity(args.run_dir, path, exported, "merged")
    if report is not None:
        print(format_parity(report) + f"; details in {path / 'parity.json'}", file=sys.stderr)
    if llamacpp_report is not None:
        print(format_parity(llamacpp_report) + f"; details in {path / 'parity-llamacpp.json'}", file=sys.stderr)
    print(path)
    return 0


def cmd_plot(args) -> int:
    from slmtune.plot import plot_runs

    print(plot_runs(args.run_dirs, args.output))
    return 0


def cmd_plan(args) -> int:
    from slmtune.training import plan

    if args.recipe:
        from slmtune.config import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        args.model = args.model or recipe.model.name
        args.seq_len = recipe.data.max_length
        print(f"Measuring {args.steps} real steps of {args.recipe} on this machine...", file=sys.stderr, flush=True)
        estimate = plan.estimate_time(args.recipe, args.overrides, probe_steps=args.steps)
        print(f"Time: {estimate.describe()}.")
    elif not args.model:
        from slmtune.config import RecipeError

        raise RecipeError("slmtune plan needs --model, or a recipe (--recipe) to estimate its time as well")

    try:
        rows, best, why, hw = plan.plan_table(args.model, args.hardware, args.seq_len, args.micro_batch,
                                              args.lora_r, args.gradient_checkpointing, args.precision)
    except ValueError as err:
        from slmtune.config import RecipeError

        raise RecipeError(str(err)) from None
    print(plan.format_plan(args.model, rows, best, why, hw))
    if args.measure:
        from slmtune.methods import SERVICE_METHODS
        from slmtune.models import resolve

        methods = list(SERVICE_METHODS)  # the methods the planner models
        print(f"\nMeasuring {args.steps} real steps per method on this machine (seq_len {args.seq_len}, "
              f"micro_batch {args.micro_batch})...", flush=True)
        measured = plan.measure(resolve(args.model), methods, args.seq_len, args.micro_batch, steps=args.steps,
                                lora_r=args.lora_r, gradient_checkpointing=args.gradient_checkpointing,
                                precision=args.precision)
        single = {e.method: e for e in rows if e.strategy == "none"}
        print(f"{'method':8} {'estimated GB':>12} {'measured GB':>12} {'error':>7}")
        for method in methods:
            est, got = single[method].total, measured[method]
            print(f"{method:8} {est / plan.GB:12.2f} {got / plan.GB:12.2f} {100 * (est - got) / got:+6.0f}%")
    return 0


def _service_settings(args):
    from slmtune.service.settings import Settings

    overrides = {k: v for k, v in {"db": getattr(args, "db", None), "workers": getattr(args, "workers", None),
                                   "max_upload_bytes": getattr(args, "max_upload_bytes", None),
                                   "allow_python_graders": getattr(args, "allow_python_graders", None) or None,
                                   "executor": getattr(args, "executor", None)}.items()
                 if v is not None}
    models = {}
    from slmtune.models import CATALOG  # here, not at the top: `slmtune --help` stays fast

    for item in getattr(args, "models", None) or []:
        name, sep, path = item.partition("=")
        if not sep and name in CATALOG:  # a bare catalog name offers that model under its own name
            name, sep, path = name, "=", name
        if not sep or not name or not path:
            from slmtune.config import RecipeError

            raise RecipeError(f"--models {item!r}: use NAME=DIR (a model directory or catalog name), or a catalog "
                              f"name alone ({', '.join(CATALOG)})")
        models[name] = path
    if models:
        overrides["models"] = models
    return Settings(**overrides)


def cmd_api(args) -> int:
    import uvicorn

    from slmtune.service.app import create_service_app

    settings = _service_settings(args)
    warn_if_exposed(args.host)
    print(f"Fine-tuning service at http://{args.host}:{args.port}/v1 ({settings.workers} worker(s), "
          f"base models: {', '.join(settings.models) or 'none'})", file=sys.stderr)
    uvicorn.run(create_service_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                # SIGTERM: stop within seconds (Kubernetes, systemd); in-flight generations are cancelled.
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    return 0


def cmd_worker(args) -> int:
    from slmtune.service.worker import main as worker_main

    return worker_main(_service_settings(args))


def cmd_migrate(args) -> int:
    """Bring the service's database schema up to date (the Kubernetes migration Job runs this before
    the API and workers start; they also migrate on start, which is a no-op once this has run)."""
    from slmtune.service.store import Store

    store = Store(_service_settings(args).db_url)
    store.migrate()
    print(f"database schema up to date ({store.engine.url.render_as_string(hide_password=True)})", file=sys.stderr)
    return 0


def cmd_keys(args) -> int:
    from slmtune.config import RecipeError
    from slmtune.service.auth import create_key
    from slmtune.service.store import Store

    store = Store(_service_settings(args).db_url)
    store.migrate()
    if args.keys_verb == "list":
        print(f"{'id':>5}  {'tenant':<16}  {'sha256 prefix':<13}  created (UTC)")
        for key_id, tenant, prefix, created in store.list_keys():
            print(f"{key_id:>5}  {tenant:<16}  {prefix:<13}  {time.strftime('%Y-%m-%d %H:%M', time.gmtime(created))}")
        return 0
    if args.keys_verb == "revoke":
        if not store.revoke_key(args.id):
            raise RecipeError(f"no API key with id {args.id}; `slmtune keys list` shows them")
        print(f"revoked key {args.id}", file=sys.stderr)
        return 0
    try:
        key = create_key(store, args.tenant)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    print(f"API key for tenant {args.tenant} (shown once; only its sha256 is stored):", file=sys.stderr)
    print(key)
    return 0


TASK_CHOICES = list(TASK_NAMES)


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
    p.add_argument("--epochs", type=epochs_arg, help="epochs, or auto (quick mode; default auto: from the number "
                   "of examples and their answers' tokens, slmtune/auto.py)")
    p.add_argument("--time-budget", help="train for about this long, e.g. 10m (= train.time_budget=...)")
    p.add_argument("--objective", metavar="NAME",
                   help="what to minimize: sft (default), or dpo / orpo on preference pairs (= train.objective=...)")
    p.add_argument("--grader", metavar="GRADER.json", help="reinforcement fine-tuning: --data holds prompts, this "
                   "grader scores sampled answers (= train.objective {name: grpo, grader: ...}; docs/reinforcement.md)")
    p.add_argument("--allow-python-graders", action="store_true", help="let a python grader run its code (sandboxed "
                   "subprocess; = train.objective.allow_python_grader=true)")
    p.add_argument("--output", help="run directory (quick mode; default runs/<model>-<method>-<time>)")
    p.add_argument("--json-events", action="store_true", help="print every training event as a JSON line on stdout")
    p.add_argument("--events-file", metavar="PATH",
                   help="also append every training event as a JSON line to PATH (flushed per line)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    launch = p.add_argument_group("data parallelism (train.distributed.strategy; re-launched through torchrun)")
    launch.add_argument("--nproc", type=int, default=1, help="processes on this node (GPUs, or CPU workers)")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes; run the same command on each")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 to nnodes-1")
    launch.add_argument("--master-addr", help="address of node 0 (several nodes)")
    launch.add_argument("--master-port", type=int, help="port on node 0 (default 29500)")
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
    val.add_argument("--task", choices=TASK_CHOICES, help="check rows as this task's data (slmtune/tasks)")
    val.add_argument("--grader", help="a grader (JSON file): check rows as reinforcement prompts it can grade")
    conv = dv.add_parser("convert", help="convert alpaca / sharegpt / csv / a datasets folder to JSONL")
    conv.add_argument("--from", dest="source", required=True, choices=["alpaca", "sharegpt", "csv", "hf-datasets"])
    conv.add_argument("input", help="input file (folder for hf-datasets)")
    conv.add_argument("output", help="JSONL file to write")
    conv.add_argument("--task", choices=TASK_CHOICES, help="csv / hf-datasets: write this task's format")
    conv.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                      help="csv / hf-datasets: the column holding FIELD; repeatable")
    conv.add_argument("--split", help="hf-datasets: the split of a DatasetDict (default train)")
    p.set_defaults(func=cmd_data)

    p = verbs.add_parser("eval", help="score a model or a run on task data; writes eval.json")
    p.add_argument("target", help="run directory or model")
    p.add_argument("--data", required=True, help="JSONL file of task rows")
    p.add_argument("--task", choices=TASK_CHOICES, help="default: the run's data.task, else from the rows")
    p.add_argument("--limit", type=int, help="evaluate the first N rows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the task's)")
    p.add_argument("--output", help="eval.json path (default: RUN_DIR/eval.json)")
    p.add_argument("--pairs", action="store_true",
                   help="also score preference pairs built from the rows (the reference answer over another "
                   "row's): win rate, and for a run reward accuracy against the model it started from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = verbs.add_parser("grade", help="a grader's mean reward on a model's answers to a file of prompts")
    p.add_argument("--grader", required=True, help="the grader, a JSON file (OpenAI's grader object; docs/graders.md)")
    p.add_argument("--data", required=True, help="JSONL rows: messages ending with a user turn, plus item fields")
    p.add_argument("--model", required=True, help="a model or a run directory, which answers the prompts")
    p.add_argument("--limit", type=int, help="the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--show", type=int, default=5, help="graded samples to print (default %(default)s)")
    p.add_argument("--allow-python", action="store_true", help="run python graders (sandboxed subprocess)")
    p.add_argument("--output", help="also write every graded sample to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_grade)

    p = verbs.add_parser("export", help="write a run as a standalone model")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["merged", "onnx", "onnx-base", "onnx-adapter", "gguf", "gguf-lora", "kaito"],
                   help="merged: HF safetensors with the adapter merged (default); onnx: for ONNX Runtime GenAI; "
                   "onnx-base: the run's base model for ONNX Runtime GenAI with LoRA inputs, shared by adapters; "
                   "onnx-adapter: the LoRA adapter alone as an .onnx_adapter over such a base (--base-onnx); "
                   "gguf: one file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile; gguf-lora: the "
                   "LoRA adapter alone, applied by llama.cpp (--lora) or Ollama (ADAPTER) on the base's GGUF; "
                   "kaito: the LoRA adapter as a Kaito adapter image build context + Workspace YAML (Kubernetes)")
    p.add_argument("--kaito-preset", metavar="NAME", help="kaito: the Workspace's inference.preset.name (default: "
                   "from the run's base model; needed when the base is a local folder)")
    p.add_argument("--kaito-image", metavar="REF", help="kaito: where you will push the adapter image, e.g. "
                   "myacr.azurecr.io/mine:v1 (default: a placeholder to edit)")
    p.add_argument("--kaito-instance-type", metavar="SKU", help="kaito: the GPU node SKU (default "
                   "Standard_NV36ads_A10_v5; '' for your own GPU nodes, node auto-provisioning off)")
    p.add_argument("--base-onnx", metavar="DIR", help="onnx-adapter: the `--format onnx-base` export the adapter "
                   "is for (its LoRA inputs name the adapter's tensors; parity runs on it)")
    p.add_argument("--base-gguf", metavar="FILE", help="gguf-lora: the base model's GGUF (for the Modelfile's FROM "
                   "and the parity check; default: a temporary f32 one)")
    p.add_argument("--quant", help="GGUF weight type: f32, f16 (default), bf16, q8_0, q5_0, q4_1, q4_0; for "
                   "k-quants (q4_k_m, ...) run llama.cpp's llama-quantize on the f16 file")
    p.add_argument("--output", metavar="OUT", help="folder to write (must not exist or be empty)")
    p.add_argument("--merge", metavar="OUT", help="same as --format merged --output OUT")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4"],
                   help="ONNX weight precision (default fp32)")
    p.add_argument("--builder-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to the ONNX model builder's --extra_options (e.g. block_size=16 for int8/int4 "
                   "quantization blocks; nodes_to_exclude=/lm_head/MatMul); repeatable")
    p.add_argument("--no-parity", action="store_true",
                   help="skip the greedy-generation parity check against the PyTorch model")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("plot", help="a PNG of runs' training/validation loss (and DPO reward margins)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", help="the PNG to write (default: RUN_DIR/curves.png for one run, else ./curves.png)")
    p.set_defaults(func=cmd_plot)

    p = verbs.add_parser("plan", help="estimate memory per method and recommend one; with --recipe, also its time")
    p.add_argument("--model", help="catalog/table name (e.g. qwen2.5-7b) or a directory with config.json")
    p.add_argument("--recipe", help="a recipe: its model and max_length for the memory table, and its training "
                   "time on this machine (measured over --steps real steps)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of --recipe")
    p.add_argument("--hardware", default="cpu:24GB", help="1x24GB, 2x80GB or cpu:32GB")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="train.precision: auto = bf16 on GPUs and on CPUs with native bf16 (this machine's CPU "
                   "is asked), else fp32")
    p.add_argument("--measure", action="store_true", help="train a few real steps per method and compare")
    p.add_argument("--steps", type=int, default=3, help="steps per method with --measure")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("chat", help="chat with a model or a fine-tuned run")
    p.add_argument("target", help="run directory or model")
    p.add_argument("--prompt", help="one message; without it, chat interactively")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("serve", help="serve a model and its adapters over an OpenAI-compatible API")
    p.add_argument("--model", required=True, help="base model: catalog name, directory, .gguf file or hub id; "
                   "with --backend onnx, a `slmtune export --format onnx` or `--format onnx-base` folder")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "llamacpp"],
                   help="torch (default; adapters), onnx (an exported model through onnxruntime-genai) or "
                   "llamacpp (a `slmtune export --format gguf` file through llama.cpp; one row at a time)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="register an adapter (run directory or PEFT adapter directory; with --backend llamacpp a "
                   "GGUF LoRA from `slmtune export RUN --format gguf-lora`; with --backend onnx an .onnx_adapter "
                   "from `--format onnx-adapter` over an `--format onnx-base` model); repeatable")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="torch backend weights: bfloat16 halves the bytes read per token (answers may differ "
                   "slightly); auto: bfloat16 where the hardware has native bf16, else float32")
    p.add_argument("--served-model-name", help="the base model's id in requests (default: its name)")
    p.add_argument("--max-loaded-adapters", type=int, default=4, help="adapters kept loaded; least recently used go")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to collect requests into a batch")
    p.add_argument("--no-continuous-batching", dest="continuous_batching", action="store_false",
                   help="requests wait for the running batch to end instead of joining it between steps")
    p.add_argument("--max-tokens-per-client", type=int, default=DEFAULT_MAX_TOKENS_PER_OWNER,
                   help="tokens (prompt + max_tokens) one client's unfinished requests may hold; 429 beyond")
    p.add_argument("--default-max-tokens", type=int, default=512, help="chat max_tokens when a request gives none")
    p.add_argument("--admin-token", help="require this bearer token on /admin (default $SLMTUNE_ADMIN_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = verbs.add_parser("adapters", help="register or remove adapters on a running server")
    av = p.add_subparsers(dest="adapters_verb", required=True)
    add = av.add_parser("add", help="register NAME for a run directory or PEFT adapter directory")
    add.add_argument("name")
    add.add_argument("path")
    remove = av.add_parser("remove", help="unregister (and unload) NAME")
    remove.add_argument("name")
    av.add_parser("list", help="registered adapters and which are loaded")
    for sub in av.choices.values():
        sub.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
        sub.add_argument("--admin-token", help="bearer token (default $SLMTUNE_ADMIN_TOKEN)")
    p.set_defaults(func=cmd_adapters)

    p = verbs.add_parser("api", help="the fine-tuning service: OpenAI-shaped files / fine_tuning / chat API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", help="SQLAlchemy URL (default: SQLite under $SLMTUNE_HOME/service; or $SLMTUNE_DB)")
    p.add_argument("--workers", type=int, help="worker processes to start (default 1; 0 with external workers)")
    p.add_argument("--models", action="append", metavar="NAME=DIR",
                   help="a base model offered for fine-tuning; the first is also served; repeatable")
    p.add_argument("--max-upload-bytes", type=int, help="upload size limit (default 50 MB)")
    p.add_argument("--allow-python-graders", action="store_true",
                   help="run tenants' python graders (in a sandboxed subprocess; docs/graders.md); off by default")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_api)

    p = verbs.add_parser("worker", help="a fine-tuning worker: runs queued jobs of the service's database")
    p.add_argument("--db", help="SQLAlchemy URL, the same as the API server's")
    p.add_argument("--executor", choices=["local", "kubernetes"],
                   help="run trainers as subprocesses (local, the default) or as Kubernetes Jobs "
                        "(docs/kubernetes.md; default $SLMTUNE_EXECUTOR)")
    p.set_defaults(func=cmd_worker)

    p = verbs.add_parser("migrate", help="create or upgrade the fine-tuning service's database schema")
    p.add_argument("--db", help="SQLAlchemy URL (default: as `slmtune api`)")
    p.set_defaults(func=cmd_migrate)

    p = verbs.add_parser("keys", help="API keys of the fine-tuning service")
    kv = p.add_subparsers(dest="keys_verb", required=True)
    kc = kv.add_parser("create", help="create a key for a tenant; prints the key on the last line")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--db", help="SQLAlchemy URL (default: as `slmtune api`)")
    kl = kv.add_parser("list", help="every key: id, tenant, sha256 prefix, creation time (keys are not stored)")
    kl.add_argument("--db", help="SQLAlchemy URL (default: as `slmtune api`)")
    kr = kv.add_parser("revoke", help="delete a key by its id (from `keys list`); requests with it get 401")
    kr.add_argument("id", type=int)
    kr.add_argument("--db", help="SQLAlchemy URL (default: as `slmtune api`)")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --nproc N` re-runs the same command under torchrun
    # Deprecation notices from transformers/peft internals are for us, not for users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        if getattr(args, "json_events", False) or getattr(args, "events_file", None):
            from slmtune.training import events  # the service's worker reads the error from the events

            line = events.to_json(events.Error(str(err)))
            if getattr(args, "json_events", False):
                print(line, flush=True)
            if getattr(args, "events_file", None):
                events.append_line(args.events_file, line)
        return 2
    except Exception as err:
        from slmtune.training.loop import TrainingStopped

        if not isinstance(err, TrainingStopped):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"{err}; continue with: slmtune train --resume {err.run_dir or args.output or args.resume}",
                  file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
