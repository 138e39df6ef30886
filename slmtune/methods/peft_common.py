"""Saving and loading for every method whose trained weights are a PEFT adapter."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

ARTIFACT = "adapter"  # the run directory's subfolder holding the trained weights


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

    set_peft_model_state_dict(model, load_peft_weights(str(path)))


def remember_initial_adapter(model) -> None:
    """Keep the freshly initialised adapter of a PiSSA/OLoRA model for the final conversion."""
    folder = Path(tempfile.mkdtemp(prefix="slmtune-initial-adapter-"))
    model.save_pretrained(folder)
    model.slmtune_initial_adapter = str(folder)
    # Leave no folder behind when the process ends.
    import atexit

    atexit.register(shutil.rmtree, folder, True)
