"""A real server for the serve tests: uvicorn on a free localhost port, in a background thread,
serving the tiny Llama from tests/conftest.py with one trained run and two perturbed adapters."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import chat_example, write_jsonl


def http_json(url: str, method: str = "POST", body=None, raw: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON) of a raw HTTP call, for what the openai client hides (exact error bodies)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` until stop(); the same way `slmtune serve` runs it, minus the process."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def perturbed_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A plain PEFT LoRA adapter directory with random (not zero) B, so it changes every output."""
    from peft import LoraConfig, get_peft_model

    from slmtune.models import load_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    model = get_peft_model(load_model(str(base_dir)), config)
    model.save_pretrained(out)
    return out


def trained_run(base_dir: Path, out: Path, data_dir: Path) -> Path:
    """A real run directory (recipe.yaml + adapter/) from a few high-learning-rate steps."""
    from slmtune.config import recipe_from_dict
    from slmtune.training.run import run

    data = write_jsonl(data_dir / "train.jsonl",
                       [chat_example(f"What is fact {i}?", f"Fact {i}: the lamp lasts {i} hours.") for i in range(8)])
    recipe = recipe_from_dict({
        "model": {"name": str(base_dir)},
        "method": {"name": "lora", "lora_r": 4, "lora_alpha": 16},
        "data": {"train": str(data), "max_length": 64},
        "train": {"micro_batch_size": 4, "learning_rate": 5e-2, "seed": 1, "precision": "fp32", "max_steps": 3,
                  "warmup_ratio": 0.0, "schedule": "constant"},
        "output": {"dir": str(out)},
    })
    run(recipe, progress=False)
    return out


@dataclass
class Served:
    url: str
    engine: object
    base_dir: Path
    base_name: str
    adapters: dict[str, Path]  # alpha (run directory), beta (registered at start), gamma (not registered)

    def client(self):
        from openai import OpenAI

        # No retries: a test wants the server's first answer, including its errors.
        return OpenAI(base_url=self.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir):
    from slmtune.serve.app import create_app
    from slmtune.serve.engine import Engine

    root = tmp_path_factory.mktemp("serve")
    adapters = {
        "alpha": trained_run(tiny_llama_dir, root / "run-alpha", root),
        "beta": perturbed_adapter(tiny_llama_dir, root / "beta", seed=1),
        "gamma": perturbed_adapter(tiny_llama_dir, root / "gamma", seed=2),
    }
    engine = Engine.load(str(tiny_llama_dir), {"alpha": str(adapters["alpha"]), "beta": str(adapters["beta"])},
                         max_loaded_adapters=2, batch_wait_ms=50, max_batch_size=8)
    server = ServerThread(create_app(engine)).start()
    yield Served(server.url, engine, tiny_llama_dir, engine.base_name, adapters)
    server.stop()
    engine.stop()
