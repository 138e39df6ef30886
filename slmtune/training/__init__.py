"""Training: `run(recipe)` and what it is made of.

    from slmtune.training import run
    result = run(load_recipe("recipes/quickstart/support_assistant.yaml"))

run.py            run(recipe): the one pipeline (load, data, method, loop, save), called by the CLI and the
                  service's workers
loop.py           the optimizer loop: accumulation, clipping, schedule, evaluation, checkpoints, stop/resume
loss.py           target-only next-token loss; cross_entropy.py its fused LM-head kernel
attention.py      per-example attention for packed rows
distributed.py    DDP / DeepSpeed ZeRO / FSDP2 behind one interface
rundir.py         the run directory's layout (the only module that knows it)
events.py         the typed events a run emits (metrics.jsonl, --json-events, the service's worker)
plan.py           memory planning per method (`slmtune plan`, the console's wizard)
"""
