"""Data parallelism (slmtune/training/distributed.py): pure parts, and 2-process CPU runs (gloo) launched the
real way, `slmtune train --nproc 2`, on the tiny Llama.

The invariant under test: one process with gradient_accumulation_steps=4 and two processes with 2
each take the same global batch per step, so they must give the same per-step losses, the same
weights, and a run directory that loads (and resumes) in one process. 22 unpacked training examples
in micro-batches of 2 make 11 micro-batches an epoch, so every epoch's last step has 3 and rank 1
runs one padding pass; likewise the 5 validation examples' third eval batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slmtune.training import distributed
from slmtune.config import RecipeError, load_recipe, recipe_from_dict
from slmtune.training.run import run
from tests.conftest import chat_example, write_jsonl

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")
METHODS = {"lora": {"name": "lora", "lora_r": 4, "lora_alpha": 8}, "full": {"name": "full"}}
LEARNING_RATES = {"lora": 5e-3, "full": 1e-3}


# --- pure parts -------------------------------------------------------------------------------------

def test_rank_share_takes_every_world_size_th_micro_batch_and_pads():
    items = list(range(7))
    assert distributed.rank_share(items, 0, 2) == [(0, True), (2, True), (4, True), (6, True)]
    assert distributed.rank_share(items, 1, 2) == [(1, True), (3, True), (5, True), (0, False)]
    assert distributed.rank_share([5], 1, 2) == [(5, False)]
    assert distributed.rank_share([], 0, 2) == []
    for world in (1, 2, 3, 4, 8):
        shares = [distributed.rank_share(items, rank, world) for rank in range(world)]
        assert len({len(share) for share in shares}) == 1  # same number of passes on every rank
        # Round-robin over ranks gives back the global list, in order, each item once.
        interleaved = [share[k] for k in range(len(shares[0])) for share in shares]
        assert [item for item, real in interleaved if real] == items


def _recipe(**train):
    return {"model": "some/model", "data": {"train": "train.jsonl"}, "train": train, "output": {"dir": "runs/x"}}


def test_distributed_config_validation():
    assert recipe_from_dict(_recipe()).train.distributed.strategy == "none"
    assert recipe_from_dict(_recipe(distributed="fsdp")).train.distributed.strategy == "fsdp"
    zero3 = recipe_from_dict(_recipe(distributed={"strategy": "zero3", "offload": "optimizer+params"}))
    assert zero3.train.distributed.offload == "optimizer+params"
    with pytest.raises(RecipeError, match="train.distributed.strategy"):
        recipe_from_dict(_recipe(distributed={"strategy": "zero4"}))
    for strategy in ("none", "ddp", "fsdp"):
        with pytest.raises(RecipeError, match="needs strategy zero1, zero2 or zero3"):
            recipe_from_dict(_recipe(distributed={"strategy": strategy, "offload": "optimizer"}))
    with pytest.raises(RecipeError, match="optimizer\\+params needs strategy zero3"):
        recipe_from_dict(_recipe(distributed={"strategy": "zero2", "offload": "optimizer+params"}))
    with pytest.raises(RecipeError, match="QLoRA"):
        recipe_from_dict(_recipe(distributed="fsdp") | {"method": "qlora"})
    with pytest.raises(RecipeError, match="pissa"):
        recipe_from_dict(_recipe(distributed="zero3") | {"method": {"name": "lora", "lora_init": "pissa"}})


def test_zero_stages_without_deepspeed_are_a_clear_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a))
    with pytest.raises(RecipeError, match="pip install -e '.\\[deepspeed\\]'"):
        distributed.check_available("zero2")
    distributed.check_available("fsdp")


def test_torchrun_command_reruns_the_same_command_without_launch_flags():
    argv = ["train", "r.yaml", "--nproc", "2", "train.epochs=1", "--master-port=1234", "--no-progress"]
    assert distributed.torchrun_command(argv, 2, python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        "-m", "slmtune.cli", "train", "r.yaml", "train.epochs=1", "--no-progress"]
    argv = ["train", "r.yaml", "--nproc=8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]
    assert distributed.torchrun_command(argv, 8, nnodes=2, node_rank=1, master_addr="10.0.0.1", python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=2", "--node_rank=1",
        "--master_addr=10.0.0.1", "--master_port=29500", "-m", "slmtune.cli", "train", "r.yaml"]


def test_deepspeed_config_per_stage_and_offload():
    config = distributed.deepspeed_config("zero3", "optimizer+params", 4, 2, 1.0, cuda=False)
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                           "offload_param": {"device": "cpu", "pin_memory": False}}
    # The loop accumulates and scales the loss itself: DeepSpeed sees one micro-batch per step.
    assert config["gradient_accumulation_steps"] == 1 and config["train_batch_size"] == 8
    assert config["gradient_clipping"] == 1.0
    config = distributed.deepspeed_config("zero1", "none", 2, 2, None, cuda=False)
    assert config["zero_optimization"] == {"stage": 1} and config["gradient_clipping"] == 0.0


# --- runs -------------------------------------------------------------------------------------------

class Lab:
    """Runs on the tiny Llama, each made once per module: one process in-process, two through the CLI."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir, self.runs, self.seconds = root, model_dir, {}, {}
        self.data = write_jsonl(root / "train.jsonl", [
            chat_example(f"What is fact number {i}?" + " Tell me." * (i % 4), f"Fact {i} is that the lamp lasts {i} hours.")
            for i in range(27)])

    def recipe(self, name: str, method: str, gradient_accumulation_steps: int, strategy: str = "none",
               offload: str = "none") -> dict:
        return {
            "model": {"name": str(self.model_dir)},
            "method": METHODS[method],
            "data": {"train": str(self.data), "max_length": 128, "validation_split": 0.2},
            "train": {"micro_batch_size": 2, "gradient_accumulation_steps": gradient_accumulation_steps,
                      "learning_rate": LEARNING_RATES[method], "warmup_ratio": 0.2, "seed": 3, "precision": "fp32",
                      "packing": False, "max_steps": 6, "save_every": 3, "eval_every": 3,
                      "distributed": {"strategy": strategy, "offload": offload}},
            "output": {"dir": str(self.root / name)},
        }

    def single(self, method: str) -> Path:
        name = f"{method}-single"
        if name not in self.runs:
            self.runs[name] = run(recipe_from_dict(self.recipe(name, method, 4)), progress=False).run_dir
        return self.runs[name]

    def launched(self, method: str, strategy: str, offload: str = "none") -> Path:
        name = f"{method}-{strategy}" + (f"-{offload}" if offload != "none" else "")
        if name not in self.runs:
            path = self.root / f"{name}.yaml"
            path.write_text(recipe_from_dict(self.recipe(name, method, 2, strategy, offload)).to_yaml())
            self.seconds[name] = slmtune_train(self.root, str(path))
            self.runs[name] = self.root / name
        return self.runs[name]


def slmtune_train(cwd: Path, *args: str) -> float:
    """`slmtune train ARGS --nproc 2` in a subprocess; returns its wall time. DeepSpeed's first run
    compiles its CPU ops (~75 s each, then cached in ~/.cache/torch_extensions)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                        "SLMTUNE_HOME": str(cwd / "slmtune-home")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slmtune.cli", "train", *args, "--nproc", "2", "--no-progress"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_llama_dir):
    return Lab(tmp_path_factory.mktemp("distributed"), tiny_llama_dir)


def losses(run_dir: Path, kind: str = "step") -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss" if kind == "step" else "eval_loss"] for line in lines if line["event"] == kind]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def outputs(model_dir: Path, run_dir: Path) -> torch.Tensor:
    """Logits of the run's result, loaded the one-process way (PeftModel / from_pretrained)."""
    from peft import PeftModel

    from slmtune.models import load_model

    if (run_dir / "adapter").is_dir():
        model = PeftModel.from_pretrained(load_model(str(model_dir)), str(run_dir / "adapter"))
    else:
        model = load_model(str(run_dir / "model"))
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 35).reshape(2, 16)).logits


def assert_same_run(lab: Lab, method: str, run_dir: Path) -> None:
    single = lab.single(method)
    assert len(losses(run_dir)) == 6
    torch.testing.assert_close(losses(run_dir), losses(single), rtol=1e-4, atol=0)
    assert len(losses(run_dir, "eval")) == 2  # steps 3 and 6, each rank evaluating its share
    torch.testing.assert_close(losses(run_dir, "eval"), losses(single, "eval"), rtol=1e-4, atol=0)
    assert summary(run_dir)["world_size"] == 2
    assert summary(run_dir)["train_tokens"] == summary(single)["train_tokens"]  # all ranks counted
    torch.testing.assert_close(outputs(lab.model_dir, run_dir), outputs(lab.model_dir, single), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,strategy", [("lora", "fsdp"), ("full", "ddp"), ("full", "fsdp")])
def test_two_processes_train_like_one_and_the_result_loads_in_one(lab, method, strategy):
    run_dir = lab.launched(method, strategy)
    assert_same_run(lab, method, run_dir)
    assert summary(run_dir)["strategy"] == strategy
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["recipe.yaml", "metrics.jsonl", "checkpoints", "summary.json", "adapter" if method == "lora" else "model"])


def test_fsdp_holds_half_the_state_of_ddp_per_process(lab):
    ddp, fsdp = (summary(lab.launched("full", s))["state_bytes_per_rank"] for s in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 2
    for rank in range(2):
        for part in ("params", "grads", "optimizer", "total"):
            assert 0.45 < fsdp[rank][part] / ddp[rank][part] < 0.55, (part, fsdp[rank], ddp[rank])
    assert ddp[0] == summary(lab.single("full"))["state_bytes_per_rank"][0]  # DDP: a whole copy per process


def test_a_sharded_checkpoint_resumes_in_one_process(lab):
    resumed = lab.root / "full-fsdp-resumed-single"
    shutil.copytree(lab.launched("full", "fsdp"), resumed)
    for name in ("summary.json", "model"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    recipe = load_recipe(resumed / "recipe.yaml", [f"output.dir={resumed}", "train.distributed.strategy=none",
                                                   "train.gradient_accumulation_steps=4"])
    result = run(recipe, resume=True, progress=False)
    assert result.summary["world_size"] == 1
    torch.testing.assert_close(losses(resumed), losses(lab.single("full")), rtol=1e-4, atol=0)
    torch.testing.assert_close(outputs(lab.model_dir, resumed), outputs(lab.model_dir, lab.single("full")),
                               rtol=1e-4, atol=1e-4)


def test_a_distributed_strategy_in_a_lone_process_is_a_world_of_one(lab):
    recipe = recipe_from_dict(lab.recipe("lora-fsdp-alone", "lora", 4, "fsdp"))
    result = run(recipe, progress=False)
    assert result.summary["strategy"] == "fsdp" and result.summary["world_size"] == 1
    torch.testing.assert_close(losses(result.run_dir), losses(lab.single("lora")), rtol=1e-4, atol=0)
    assert "MASTER_ADDR" not in os.environ  # the process group and its environment are gone


@needs_deepspeed
def test_deepspeed_zero3_trains_like_one_process_on_half_the_parameters(lab):
    run_dir = lab.launched("lora", "zero3")
    assert_same_run(lab, "lora", run_dir)
    zero3 = summary(run_dir)["state_bytes_per_rank"]
    ddp = summary(lab.single("lora"))["state_bytes_per_rank"] * 2  # DDP: one process's state on each rank
    for rank in range(2):
        assert zero3[rank]["params"] == pytest.approx(ddp[rank]["params"] / 2, rel=0.05)
        # fp32 training: DeepSpeed keeps an fp32 master partition beside the parameters, so not quite half.
        assert zero3[rank]["total"] < 0.7 * ddp[rank]["total"], (zero3[rank], ddp[rank])


@needs_deepspeed
def test_deepspeed_zero2_resumes_a_one_process_checkpoint(lab):
    resumed = lab.root / "full-single-resumed-zero2"
    shutil.copytree(lab.single("full"), resumed)
    for name in ("summary.json", "model"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    # Same global batch: 2 processes x 2 accumulation steps = 1 process x 4.
    slmtune_train(lab.root, "--resume", str(resumed), f"output.dir={resumed}", "train.distributed.strategy=zero2",
                  "train.gradient_accumulation_steps=2")
    assert summary(resumed)["strategy"] == "zero2"
    torch.testing.assert_close(losses(resumed), losses(lab.single("full")), rtol=1e-4, atol=0)
    torch.testing.assert_close(outputs(lab.model_dir, resumed), outputs(lab.model_dir, lab.single("full")),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_offload_trains_like_one_process(lab):
    """slow: the first run compiles DeepSpeed's CPU Adam (~2 min, then cached)."""
    assert_same_run(lab, "lora", lab.launched("lora", "zero3", "optimizer+params"))
