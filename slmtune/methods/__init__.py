"""Fine-tuning methods, one file each. A method module holds:

    Config                 pydantic model with a `name` literal (the recipe's `method` section)
    prepare(model, cfg)    freeze what must not train, add what must; returns the model to train
    save_trained / load_trained(model, path)   the trained weights, for checkpoints and the result;
                           save_trained(..., state_dict=) writes gathered weights of a sharded model
    ARTIFACT               run-directory folder of the result: "adapter" or "model"
    load_kwargs(cfg)       optional: extra from_pretrained arguments (quantization)
    PACKING = False        optional: the method cannot train on packed rows

To add a method: write `methods/<name>.py` and add one line to METHODS below.
"""

from slmtune.methods import dora, full, ia3, lora, prefix_tuning, prompt_tuning, qlora

METHODS = {
    "lora": lora,
    "dora": dora,
    "qlora": qlora,
    "full": full,
    "ia3": ia3,
    "prompt_tuning": prompt_tuning,
    "prefix_tuning": prefix_tuning,
}

METHOD_CONFIGS = {name: module.Config for name, module in METHODS.items()}
