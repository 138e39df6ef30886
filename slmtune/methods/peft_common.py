"""Saving and loading for every method whose trained weights are a PEFT adapter."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

def save_trained(model, path, final: bool = False, state_dict: dict | None = None) -> None:
    """Write the adapter in PEFT format (loadable with PeftModel.from_pretrained).

    PiSSA/OLoRA rewrite the frozen base weights at initialisation; for the final artifact the
    adapter is converted (rank doubles) so that it applies to the *original* base model.
    `state_dict`: the gathered weights when the model's own are sharded (FSDP, ZeRO-3)."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    initial = getattr(model, "slmtune_initial_adapter", None)
    if final and initial is not None:
        model.save_pretrained(path, path_initial_model_for_weight_conversion=initial, **extra)
    else:
        model.save_pretrained(path, **extra)


def load_trained(model, path) -> None:
    """Load adapter weights saved by save_trained (not converted) into an already prepared model."""
    from peft import load_peft_weights, set_peft_model_state_dict

    loaded = set_peft_model_state_dict(model, load_peft_weights(str(path)))
    # Prompt-learning weights (virtual tokens) are loaded apart from the module weights, and PEFT
    # lists them as unexpected although they were loaded.
    unexpected = list(getattr(loaded, "unexpected_keys", None) or [])
    if unexpected and prompt_learning_config(model) is None:
        raise ValueError(f"{path}: adapter weights for modules this model's adapter does not have: {unexpected[:3]}")


def remember_initial_adapter(model) -> None:
    """Keep the freshly initialised adapter of a PiSSA/OLoRA model for the final conversion."""
    folder = Path(tempfile.mkdtemp(prefix="slmtune-initial-adapter-"))
    model.save_pretrained(folder)
    model.slmtune_initial_adapter = str(folder)
    # Leave no folder behind when the process ends.
    import atexit

    atexit.register(shutil.rmtree, folder, True)


def skip_adapter_input_upcast(model) -> None:
    """Let PEFT's adapter layers take their input as it comes (bf16 under autocast) instead of first
    casting it to the dtype of the fp32 adapter weights. Call it only for bf16-autocast training.

    Under autocast each adapter matmul casts that fp32 copy straight back to bf16, so the result is
    the same bit for bit; the round trip cost two activation-sized copies per adapted layer in
    forward and two more in backward (with them a LoRA step ran at 0.83x, docs/benchmarks.md). Without
    autocast fp32 adapters need fp32 inputs, so the cast stays. DoRA keeps it too: part of its
    magnitude path runs outside autocast's matmuls, so skipping the cast would change its numerics."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not any(getattr(module, "use_dora", {}).values()):
            module.cast_input_dtype_enabled = False


# A PeftModel is recognised by its interface rather than isinstance(model, peft.PeftModel): importing
# peft takes ~9 s here, and plain models (full fine-tuning, base models) never need it.
def unwrap(model):
    """The transformers model under a PEFT wrapper (the model itself when it has none)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


def has_adapter(model) -> bool:
    """Whether `model` is a PeftModel whose adapter can be switched off (the base then runs)."""
    return getattr(model, "disable_adapter", None) is not None


def prompt_learning_config(model):
    """The active PEFT config when `model` is a prompt/prefix-tuning PeftModel (virtual tokens), else None."""
    config = getattr(model, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None
