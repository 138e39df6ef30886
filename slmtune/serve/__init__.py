"""Serve one base model and its fine-tuned adapters over an OpenAI-compatible HTTP API.

    slmtune serve --model smollm2-135m-instruct --adapter support=runs/quickstart --port 8000

adapters.py  the allow-list of adapter names and the LRU of adapters loaded on the model
engine.py    the engine thread: request queue, batched generation, sampling, stop conditions
app.py       the FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /admin/...
onnx_engine.py  `--backend onnx`: the same engine over an ONNX Runtime GenAI export (no adapters)
"""

# Tokens (prompt + max_tokens of each) one owner's unfinished requests may hold in the engine: 32
# rows of a full 8k context, or ~400 chat answers of the default 512 tokens. Beyond it: HTTP 429.
DEFAULT_MAX_TOKENS_PER_OWNER = 262_144
