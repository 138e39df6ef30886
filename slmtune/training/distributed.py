"""Data parallelism for the one training loop: DDP, DeepSpeed ZeRO-1/2/3 (+ offload) and PyTorch FSDP2.

    slmtune train recipe.yaml --nproc 2 train.distributed.strategy=fsdp    # re-launches itself via torchrun

The loop's invariant holds for every strategy and number of processes: an optimizer step consumes
micro_batch_size x gradient_accumulation_steps x world_size rows, namely the global list of
micro-batches one process would take, rank r taking every world_size-th (`rank_share`). Each
micro-batch's summed token loss is divided by the target tokens of the whole global step (summed
over ranks first) and multiplied by world_size, because DDP, FSDP and DeepSpeed *average* gradients
over ranks. So a global batch gives one process's losses and updates, up to float summation order.

Only rank 0 writes files. Checkpoints and the final adapter/ or model/ are gathered into the
ordinary single-process format, so a sharded run's result loads in one process and `--resume` works
with any number of processes.

Each strategy is a class with the small interface train.py calls:
    setup(module, param_groups, **adamw) -> optimizer    wrap the loss module, build AdamW
    share(items)                                         this rank's micro-batches of a global list
    forward_backward(batch, amp_dtype, step_targets, last) / loss(batch, amp_dtype)
    optimizer_step(max_grad_norm) -> grad norm           clip, step, zero the gradients
    all_sum(values)                                      sums over ranks
    trained_state_dict / optimizer_state_dict / load_optimizer_state_dict   full, gathered state
    state_bytes_per_rank()                               parameter+gradient+optimizer bytes per rank
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import signal
import socket
import subprocess
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from slmtune.config import ZERO_STAGES, RecipeError

# `slmtune train` flags that start processes; the re-launched command must not see them.
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


# --- pure parts -------------------------------------------------------------------------------------

def rank_share(items: list, rank: int, world_size: int) -> list[tuple[object, bool]]:
    """This rank's part of one global step's micro-batches: items[rank::world_size], as (item, True).

    Ranks must run the same number of forward/backward passes (FSDP and ZeRO-3 gather parameters
    collectively in each), so a rank left short at the end of an epoch gets (items[0], False)
    padding passes, whose loss counts zero."""
    per_rank = math.ceil(len(items) / world_size)
    mine = [(item, True) for item in items[rank::world_size]]
    return mine + [(items[0], False)] * (per_rank - len(mine)) if items else []


def strip_launch_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.split("=", 1)[0] in LAUNCH_FLAGS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def torchrun_command(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None,
                     python: str = sys.executable) -> list[str]:
    """`python -m torch.distributed.run ... -m slmtune.cli <argv without the launch flags>`.

    One node without an address: torchrun's --standalone rendezvous on a free local port. Several
    nodes: the same command on every node, with its --node-rank and rank 0's address and port."""
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and master_addr is None and master_port is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr or '127.0.0.1'}",
                f"--master_port={master_port or 29500}"]
    return cmd + ["-m", "slmtune.cli"] + strip_launch_flags(argv)


def deepspeed_config(strategy: str, offload: str, micro_batch_size: int, world_size: int,
                     max_grad_norm: float | None, cuda: bool) -> dict:
    """The DeepSpeed config of a zero stage. The loop accumulates itself (one DeepSpeed micro-step per
    backward, boundary set by hand) and scales the loss itself, so gradient_accumulation_steps is 1.
    Parameters stay fp32 (bf16 is the loop's autocast), as in one process."""
    zero: dict = {"stage": int(strategy[-1])}
    if offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW without offload
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks (FSDP shards each as one unit: gathered for its forward, then freed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


# --- launching --------------------------------------------------------------------------------------

def launch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
           master_port: int | None = None) -> int:
    """Run `slmtune <argv>` on nproc processes through torchrun; returns its exit code, 130 when
    stopped by SIGINT/SIGTERM. torchrun runs in its own session, so a terminal's Ctrl-C reaches it
    once, from here; it passes it on to every worker, and they checkpoint at the next step boundary."""
    cmd = torchrun_command(argv, nproc, nnodes, node_rank, master_addr, master_port)
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    child = subprocess.Popen(cmd, start_new_session=True)
    signalled = []

    def forward(signum, frame):
        signalled.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if signalled else code


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_available(strategy: str) -> None:
    """Raise RecipeError now, not inside every process, when the strategy's library is missing."""
    if strategy in ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"train.distributed.strategy {strategy} needs DeepSpeed: pip install -e '.[deepspeed]'")


def start(cfg) -> "SingleProcess":
    """The strategy object for this process, from the recipe's `train` section. Under torchrun
    (WORLD_SIZE > 1) strategy none means ddp; a distributed strategy in a lone process runs it on a
    world of one (DeepSpeed offload still applies)."""
    strategy, offload = cfg.distributed.strategy, cfg.distributed.offload
    check_available(strategy)
    if strategy == "none":
        if launched_world_size() == 1:
            return SingleProcess()
        strategy = "ddp"
    owned_env = _init_process_group()
    cls = {"ddp": DDP, "fsdp": FSDP}.get(strategy, DeepSpeedZeRO)
    par = cls(strategy, offload, micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm)
    par.owned_env = owned_env
    return par


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group() -> list[str]:
    """Join torchrun's process group (gloo on CPU, NCCL with CUDA); without torchrun, a world of one.
    Returns the environment variables it set, removed again at shutdown."""
    owned = []
    if "MASTER_ADDR" not in os.environ:
        defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                    "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        for key, value in defaults.items():
            if key not in os.environ:
                os.environ[key] = value
                owned.append(key)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return owned


# --- helpers on tensors -----------------------------------------------------------------------------

def _full(tensor):
    """A DTensor's whole value (collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _persistent_buffers(model):
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def _adamw_group_defaults(**adamw) -> dict:
    """The hyperparameters of a torch.optim.AdamW group (what a one-process checkpoint holds)."""
    group = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], **adamw).param_groups[0]
    return {k: v for k, v in group.items() if k != "params"}


# --- strategies -------------------------------------------------------------------------------------

class SingleProcess:
    """One process, no wrapping: the loop as it always was. The base of the other strategies."""

    strategy = "none"
    offload = "none"
    # DDP, FSDP and DeepSpeed average gradients over ranks; the loss is scaled so they sum instead.
    grad_scale = 1.0
    owned_env: list[str] = []

    def __init__(self, strategy: str = "none", offload: str = "none", **options):
        self.strategy, self.offload, self.options = strategy, offload, options
        self.rank, self.world_size = 0, 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.memory: dict | None = None  # set at the first optimizer step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def share(self, items: list) -> list[tuple[object, bool]]:
        return rank_share(items, self.rank, self.world_size)

    # setup
    def setup(self, module: torch.nn.Module, param_groups: Callable, **adamw) -> torch.optim.Optimizer:
        """Wrap `module` (whose forward(batch, amp_dtype) is the summed target loss) for this strategy
        and build AdamW over param_groups(module); returns the optimizer the scheduler drives."""
        self.module, self.wrapped = module, self._wrap(module)
        self.optimizer = torch.optim.AdamW(param_groups(module), **adamw)  # after _wrap: FSDP swaps parameters
        return self.optimizer

    def _wrap(self, module):
        """The callable that runs `module` for this strategy (FSDP shards `module` in place)."""
        return module

    # one step
    def loss(self, batch: dict, amp_dtype) -> torch.Tensor:
        return self.wrapped(batch, amp_dtype)

    def forward_backward(self, batch: dict, amp_dtype, step_targets: int, last: bool) -> float:
        """Backward of one micro-batch's loss / step_targets; returns that loss (0 for padding)."""
        padding = batch.get("padding", False)
        with self._accumulating(last):
            loss = self.loss(batch, amp_dtype) / step_targets
            self._backward(loss * (0.0 if padding else self.grad_scale))
        return 0.0 if padding else loss.item()

    def _accumulating(self, last: bool):
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, max_grad_norm: float | None) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_bytes = _nbytes(_local(p.grad) for p in params) if self.memory is None else 0
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        self.optimizer.step()
        if self.memory is None:
            self._measure(grad_bytes)
        self.optimizer.zero_grad(set_to_none=True)
        return float(_full(norm))

    # sums over ranks
    def all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
                dist.barrier()

    # full state, in the one-process format
    def trained_state_dict(self, model, trainable_only: bool) -> dict | None:
        """None when `model`'s own parameters are whole (save it as it is); else its gathered weights
        (trainable ones only if asked) on rank 0 and {} elsewhere. Every rank calls it."""
        return None

    def optimizer_state_dict(self, step: int) -> dict:
        """What torch.optim.AdamW.state_dict() holds in one process (full tensors). Every rank calls it."""
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # memory
    def _measure(self, grad_bytes: int) -> None:
        params = _nbytes(_local(p) for p in self.module.parameters())
        states = _nbytes(_local(v) for s in self.optimizer.state.values() for v in s.values())
        self.memory = {"params": params, "grads": grad_bytes, "optimizer": states,
                       "total": params + grad_bytes + states}

    def state_bytes_per_rank(self) -> list[dict | None]:
        """Bytes of the local parameters, gradients and optimizer states (shards where sharded), as
        measured at the first optimizer step, for every rank. Every rank calls it."""
        if self.world_size == 1:
            return [self.memory]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, self.memory)
        return out

    def shutdown(self, clean: bool = True) -> None:
        """Leave the process group (after a barrier when the run ended normally on every rank: tearing
        down while a peer still communicates can abort it)."""
        if self.strategy != "none" and dist.is_available() and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        for key in self.owned_env:
            os.environ.pop(key, None)


class _Distributed(SingleProcess):
    def __init__(self, strategy: str, offload: str = "none", **options):
        super().__init__(strategy, offload, **options)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.grad_scale = float(self.world_size)

    def _broadcast_trainable(self, module) -> None:
        """Rank 0's initial trainable weights everywhere (they agree anyway: same seed, same data)."""
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


class DDP(_Distributed):
    """Every rank holds the whole model and optimizer; gradients are all-reduced once per step."""

    def _wrap(self, module):
        cuda = self.device.type == "cuda"
        return DistributedDataParallel(module, device_ids=[self.device.index] if cuda else None)

    def _accumulating(self, last: bool):
        return contextlib.nullcontext() if last else self.wrapped.no_sync()


class FSDP(_Distributed):
    """PyTorch FSDP2 (`fully_shard`), the native ZeRO-3: parameters, gradients and optimizer states
    are sharded over ranks; each transformer block is gathered for its forward/backward only."""

    def _wrap(self, module):

        self._broadcast_trainable(module)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in decoder_layers(module.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module

    def _accumulating(self, last: bool):
        self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def trained_state_dict(self, model, trainable_only):
        out = {}
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            full = _full(p.detach())
            if self.is_main:
                out[name] = full.cpu().clone()
        if not trainable_only and self.is_main:
            out.update((name, buf.detach().cpu().clone()) for name, buf in _persistent_buffers(model))
        return out

    def optimizer_state_dict(self, step):
        state = self.optimizer.state_dict()
        state["state"] = {index: {key: _full(value).cpu() for key, value in entry.items()}
                          for index, entry in state["state"].items()}
        return state

    def load_optimizer_state_dict(self, state):
        params = [p for group in self.optimizer.param_groups for p in group["params"]]

        def shard(value, p):
            if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            return value

        sharded = {index: {key: shard(value, params[index]) for key, value in entry.items()}
                   for index, entry in state["state"].items()}
        self.optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


class DeepSpeedZeRO(_Distributed):
    """DeepSpeed's engine: ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also
    parameters; offload keeps optimizer states (and ZeRO-3 parameters) in CPU memory, stepped by
    DeepSpeedCPUAdam. Needs `pip install -e '.[deepspeed]'`; the first run compiles DeepSpeed's ops."""

    def setup(self, module, param_groups, **adamw):
        import deepspeed  # the optional extra .[deepspeed]
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        groups = param_groups(module)
        self.groups = [list(group["params"]) for group in groups]
        self.adamw_defaults = _adamw_group_defaults(**adamw)
        if self.offload != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **adamw)
        else:
            optimizer = torch.optim.AdamW(groups, **adamw)
        config = deepspeed_config(self.strategy, self.offload, self.options["micro_batch_size"], self.world_size,
                                  self.options["max_grad_norm"], self.device.type == "cuda")
        self.wrapped, self.zero, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module, self.optimizer = module, optimizer  # the basic optimizer: its param_groups carry the lr
        self._pending_state: dict | None = None
        return optimizer

    def _accumulating(self, last):
        self.wrapped.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def _backward(self, loss):
        self.wrapped.backward(loss)

    def forward_backward(self, batch, amp_dtype, step_targets, last):
        if self._pending_state is not None:
            self._restore_optimizer_state(batch, amp_dtype)
        return super().forward_backward(batch, amp_dtype, step_targets, last)

    def optimizer_step(self, max_grad_norm):
        grad_bytes = self._grad_bytes() if self.memory is None else 0
        self.wrapped.step()  # clips to gradient_clipping, steps, zeroes the gradients
        if self.memory is None:
            self._measure(grad_bytes)
        norm = self.wrapped.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def trained_state_dict(self, model, trainable_only):
        if self.strategy != "zero3":
            return None  # ZeRO-1/2 keep whole parameters on every rank
        import deepspeed  # the optional extra .[deepspeed]

        out = {}
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.is_main:
                    out[name] = p.detach().cpu().clone()
        if not trainable_only and self.is_main:
            out.update((name, buf.detach().cpu().clone()) for name, buf in _persistent_buffers(model))
        return out

    def _link_optimizer_states(self) -> None:
        """ZeRO-1/2 (DeepSpeed 0.19) link each parameter to its slice of the optimizer states right
        after stepping the *first* param group, before the second group has states; link all groups so
        that safe_get/set_full_optimizer_state work for the no-decay group too."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        if hasattr(self.zero, "bit16_groups") and hasattr(self.zero, "single_partition_of_fp32_groups"):
            for params, flat in zip(self.zero.bit16_groups, self.zero.single_partition_of_fp32_groups):
                if self.zero.optimizer.state.get(flat):
                    lazy_init_hp_params_optimizer_state(params, flat, self.zero.optimizer.state)

    def optimizer_state_dict(self, step):
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link_optimizer_states()
        state, groups, index = {}, [], 0
        for params, live in zip(self.groups, self.optimizer.param_groups):
            groups.append({**self.adamw_defaults, **{k: live[k] for k in ("lr", "initial_lr", "weight_decay")
                                                     if k in live},
                           "params": list(range(index, index + len(params)))})
            for p in params:
                if step > 0:
                    shape = getattr(p, "ds_shape", p.shape)
                    state[index] = {"step": torch.tensor(float(step))}
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[index][key] = safe_get_full_optimizer_state(p, key).detach().reshape(shape).cpu()
                index += 1
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, state):
        # DeepSpeed creates its (flat, partitioned) optimizer states at the first step; the moments are
        # written into them right before the first forward (`_restore_optimizer_state`).
        for live, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            for key in ("lr", "initial_lr"):
                if key in saved:
                    live[key] = saved[key]
        self._pending_state = state

    def _restore_optimizer_state(self, batch, amp_dtype) -> None:
        """One step at learning rate 0 on a zero loss creates DeepSpeed's optimizer states without
        changing any weight; then the saved moments and step count are written into them."""
        from deepspeed.utils import safe_set_full_optimizer_state

        state, self._pending_state = self._pending_state, None
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.wrapped.set_gradient_accumulation_boundary(True)
        self.wrapped.backward(self.loss(batch, amp_dtype) * 0.0)
        self.wrapped.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._link_optimizer_states()
        params = [p for group in self.groups for p in group]
        step = 0
        for index, entry in state["state"].items():
            step = int(entry["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(params[int(index)], entry[key].to(self.device), key)
        for entry in self.optimizer.state.values():
            if "step" in entry:
                entry["step"] = torch.tensor(float(step)) if torch.is_tensor(entry["step"]) else step

    def _master_partitions(self) -> list:
        return list(getattr(self.zero, "single_partition_of_fp32_groups", None)
                    or getattr(self.zero, "fp32_partitioned_groups_flat", None) or [])

    def _grad_bytes(self) -> int:
        zero = self.zero
        tensors = [p.grad for p in self.module.parameters()]
        for grads in (getattr(zero, "averaged_gradients", None) or {}).values():
            tensors += list(grads or [])
        tensors.append(getattr(zero, "grad_partitions_flat_buffer", None))
        tensors += [t.grad for t in self._master_partitions()]
        return _nbytes(tensors)

    def _measure(self, grad_bytes):
        params = _nbytes(getattr(p, "ds_tensor", p) for p in self.module.parameters())
        states = [v for s in self.optimizer.state.values() for v in s.values()] + self._master_partitions()
        states = _nbytes(states)  # optimizer states and the fp32 master partitions they update
        self.memory = {"params": params, "grads": grad_bytes, "optimizer": states,
                       "total": params + grad_bytes + states}
