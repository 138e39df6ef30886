"""Fine-tuning methods, one file each. A method file holds its config model (with a `name`
literal) and `prepare(model, cfg) -> model`, which freezes what must not train.

To add a method: write `methods/<name>.py` and add one line to METHODS below.
"""

from slmtune.methods import lora

METHODS = {
    "lora": lora,
}

METHOD_CONFIGS = {name: module.Config for name, module in METHODS.items()}
