"""Service settings: from arguments, else environment variables (SLMTUNE_*), else defaults.

    SLMTUNE_HOME               root of everything (default ~/.cache/slmtune); the service keeps
                               service/service.db (SQLite), service/files/ and service/jobs/ there
    SLMTUNE_DB                 SQLAlchemy URL; default sqlite:///$SLMTUNE_HOME/service/service.db
    SLMTUNE_WORKERS            worker processes the API server starts (default 1)
    SLMTUNE_MODELS             base models offered, JSON {"name": "dir or catalog name"}; default
                               {"smollm2-135m-instruct": "smollm2-135m-instruct"}, the catalog's
                               default model, pulled on first use like `slmtune train` does
    SLMTUNE_MAX_QUEUED_JOBS    jobs a tenant may have queued or running at once (default 20; 429 beyond)
    SLMTUNE_TOKEN_COUNT_SECONDS  when a job request counting its file's answer tokens for "auto" epochs
                               stops (at the next row; default 30): a 400 token_count_too_slow, which
                               suggests n_epochs
    SLMTUNE_MAX_FILES          files a tenant may keep (default 200), SLMTUNE_MAX_TENANT_BYTES their
                               total size (default 2 GB); 429 beyond
    SLMTUNE_PUBLIC_DOCS        serve /docs, /redoc and /openapi.json (default false: they describe
                               every route to anyone)
    SLMTUNE_MAX_UPLOAD_BYTES   upload size limit (default 50 MB)
    SLMTUNE_HEARTBEAT_INTERVAL / SLMTUNE_HEARTBEAT_TIMEOUT   seconds (2 / 15): a running job whose
                               worker has not sent a heartbeat for the timeout goes back to the queue
    SLMTUNE_CHECKPOINT_EVERY   train.save_every for jobs; 0 = once per epoch (default)
    SLMTUNE_TRAIN_THREADS      torch threads per training process (default: torch's choice)
    SLMTUNE_TRAIN_PRECISION    jobs' train.precision: auto (bf16 autocast where the hardware has native
                               bf16; the default), bf16 or fp32
    SLMTUNE_SERVE_THREADS      llama.cpp's decoding threads on the llamacpp backend (default: the CPUs
                               this process may use)
    SLMTUNE_MAX_ATTEMPTS       a job claimed this many times (its workers kept dying) fails (default 5)
    SLMTUNE_SERVE_DTYPE        weights of the served base model: auto (bfloat16 where the hardware
                               has native bf16, else float32; the default), float32 or bfloat16
    SLMTUNE_SERVE_BACKEND      torch (the default) or llamacpp: the base model converted once to a GGUF
                               file of SLMTUNE_SERVE_GGUF_QUANT (q8_0; f16, bf16, f32) under
                               service/gguf/, decoded by llama.cpp, fine-tuned LoRA models as GGUF LoRAs
                               on it (`pip install -e ".[gguf]"`; docs/serving.md)
    SLMTUNE_SERVE_MAX_BATCH_SIZE  rows the serving engine decodes together (default 8; up to twice
                               that while requests of tenants below their fair share join a full batch)
    SLMTUNE_SERVE_CONTINUOUS_BATCHING  requests join running batches between decoding steps
                               (default true; false: they wait for the running batch to end)
    SLMTUNE_SERVE_MAX_TOKENS_PER_TENANT  tokens (prompt + max_tokens of each) a tenant's unfinished
                               chat/completion requests may hold in the engine (default 262144; 429)

    SLMTUNE_EXECUTOR           how a worker runs a job's trainer: local (a subprocess; the default) or
                               kubernetes (a batch/v1 Job per job; slmtune/service/kubernetes.py):
    SLMTUNE_KUBERNETES_IMAGE   the trainer's image (default slmtune:cpu)
    SLMTUNE_KUBERNETES_NAMESPACE  where Jobs are created (default: the worker pod's own namespace,
                               else "default")
    SLMTUNE_KUBERNETES_HOME_CLAIM  the ReadWriteMany PVC holding SLMTUNE_HOME (default slmtune-home),
                               mounted in the trainer's pod at the worker's SLMTUNE_HOME path
    SLMTUNE_KUBERNETES_GPUS    GPUs a job's trainer asks for (default 0: CPU); more when `slmtune plan`
                               says one GPU of SLMTUNE_KUBERNETES_GPU_MEMORY_GB (default 24) is too small
                               and the recipe shards (zero3/fsdp), over nodes of
                               SLMTUNE_KUBERNETES_GPUS_PER_NODE (default 8) GPUs
    SLMTUNE_KUBERNETES_GPU_RESOURCE  the GPU resource name (default nvidia.com/gpu)
    SLMTUNE_KUBERNETES_NODE_SELECTOR / SLMTUNE_KUBERNETES_TOLERATIONS  JSON, for the trainer's pods
    SLMTUNE_KUBERNETES_SERVICE_ACCOUNT  the trainer pods' service account (default: the namespace's)
    SLMTUNE_KUBERNETES_SCHEDULE_TIMEOUT  seconds a trainer pod may stay unschedulable or unable to
                               start (image pull) before the job fails with Kubernetes' reason (600)
    SLMTUNE_KUBERNETES_MAX_RETRIES  an evicted or OOM-killed trainer restarts from its checkpoint up
                               to this many times (default 3), after 10 s, 20 s, 40 s ... (at most 5 min)

Workers and the API server must see the same SLMTUNE_HOME (files and run directories live there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from slmtune.config import Precision
from slmtune.models import DEFAULT_MODEL, slmtune_home
from slmtune.serve import DEFAULT_MAX_TOKENS_PER_OWNER


def default_home() -> Path:
    return slmtune_home()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLMTUNE_", extra="ignore")

    home: Path = Field(default_factory=lambda: default_home())
    db: str | None = None
    workers: int = Field(1, ge=0)
    models: dict[str, str] = Field(default_factory=lambda: {DEFAULT_MODEL: DEFAULT_MODEL})
    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1)
    heartbeat_interval: float = Field(2.0, gt=0)
    heartbeat_timeout: float = Field(15.0, gt=0)
    poll_interval: float = Field(0.5, gt=0)
    checkpoint_every: int = Field(0, ge=0)
    max_attempts: int = Field(5, ge=1)  # a job whose workers died this many times fails
    train_threads: int | None = Field(None, ge=1)
    # Jobs' train.precision: "auto" autocasts to bf16 where the CPU/GPU has native bf16; "fp32"
    # trades speed for fp32 numerics on such machines too.
    train_precision: Precision = "auto"
    serve_threads: int | None = Field(None, ge=1)
    serve: bool = True  # load the first base model and serve fine-tuned models on /v1/chat/completions
    # A base that fails to load is tried again after this many seconds, doubling up to ten minutes
    # (a volume mounted late, a download that failed); meanwhile the fine-tuning API serves.
    engine_retry_seconds: float = Field(30.0, gt=0)
    serve_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    serve_backend: Literal["torch", "llamacpp"] = "torch"
    serve_gguf_quant: Literal["f32", "f16", "bf16", "q8_0"] = "q8_0"
    serve_max_batch_size: int = Field(8, ge=1, le=256)
    serve_continuous_batching: bool = True
    serve_max_tokens_per_tenant: int = Field(DEFAULT_MAX_TOKENS_PER_OWNER, ge=1)
    max_queued_jobs: int = Field(20, ge=1)
    token_count_seconds: float = Field(30.0, gt=0)
    max_files: int = Field(200, ge=1)
    max_tenant_bytes: int = Field(2 * 1024**3, ge=1)
    public_docs: bool = False
    allow_python_graders: bool = False  # python graders run the tenant's code (sandboxed): the operator opts in
    # Where jobs' `integrations: [{"type": "mlflow"}]` report: the operator's server, never a URI a
    # tenant sends (the server would connect wherever it is told). None: SQLite in the job's run folder.
    mlflow_tracking_uri: str | None = None
    executor: Literal["local", "kubernetes"] = "local"
    kubernetes_image: str = "slmtune:cpu"
    kubernetes_namespace: str | None = None
    kubernetes_home_claim: str = "slmtune-home"
    kubernetes_gpus: int = Field(0, ge=0)
    kubernetes_gpu_memory_gb: float = Field(24.0, gt=0)
    kubernetes_gpus_per_node: int = Field(8, ge=1)
    kubernetes_gpu_resource: str = "nvidia.com/gpu"
    kubernetes_node_selector: dict[str, str] = Field(default_factory=dict)
    kubernetes_tolerations: list[dict] = Field(default_factory=list)
    kubernetes_service_account: str | None = None
    kubernetes_schedule_timeout: float = Field(600.0, gt=0)
    kubernetes_max_retries: int = Field(3, ge=0)
    kubernetes_retry_backoff: float = Field(10.0, ge=0)
    kubernetes_ttl_seconds: int = Field(3600, ge=0)  # finished Jobs are garbage-collected after this

    @property
    def service_dir(self) -> Path:
        return Path(self.home) / "service"

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.service_dir / 'service.db'}"
