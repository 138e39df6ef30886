"""Fine-tuning methods, one file each; every file ends with `METHOD = Method(...)`.

    from slmtune.methods import METHODS
    method = METHODS[recipe.method.name]
    model = method.prepare(model, recipe.method)        # freeze what must not train, add what must
    method.save_trained(model, run_dir / method.artifact, final=True)

To add a method: write `methods/<name>.py` (its Config, prepare, and a METHOD) and add one line to
METHODS below. Fields a method need not set have defaults (no quantization, packing allowed...).

The method modules import peft inside their functions: importing peft takes ~8 s on these machines,
and recipes, validation and `slmtune --help` import this package for the Config classes alone.
"""

from __future__ import annotations

from slmtune.methods import dora, full, ia3, lora, prefix_tuning, prompt_tuning, qlora
from slmtune.methods.method import Method

METHODS: dict[str, Method] = {m.name: m for m in (
    lora.METHOD,
    dora.METHOD,
    qlora.METHOD,
    full.METHOD,
    ia3.METHOD,
    prompt_tuning.METHOD,
    prefix_tuning.METHOD,
)}

METHOD_CONFIGS = {name: m.Config for name, m in METHODS.items()}

# What the fine-tuning service and its console offer (LoRA-family adapters its server can serve,
# and full fine-tuning); every other method is for recipes.
SERVICE_METHODS = ("lora", "qlora", "dora", "full")
