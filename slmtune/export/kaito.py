"""Export a run's LoRA adapter for Kaito (Kubernetes AI Toolchain Operator): an adapter image build
context and a Workspace that serves the adapter on Kaito's copy of the base model.

    slmtune export runs/mine --format kaito --output exports/mine-kaito \\
        [--kaito-image myacr.azurecr.io/mine:v1] [--kaito-preset NAME] [--kaito-instance-type SKU]
    cd exports/mine-kaito && docker build -t myacr.azurecr.io/mine:v1 . && docker push myacr.azurecr.io/mine:v1
    kubectl apply -f workspace.yaml

Written against Kaito v0.12.0 (github.com/kaito-project/kaito, commit 056b8280b1a8), read, not run:
no cluster and no Kaito were available where this was written. What it relies on, and where Kaito has it:
- The adapter image (pkg/workspace/image/README.md, "KAITO Adapter Image Format"): any OCI image with
  /data/adapter_config.json and /data/adapter_model.safetensors; `FROM scratch` plus two COPYs is
  conformant. For each `inference.adapters[]` entry with an image, Kaito adds an init container
  `puller-<source.name>` (pkg/workspace/manifests/manifests.go) that unpacks the image's layers and
  moves /data to /mnt/adapter/<source.name> (puller.sh), the folder the inference server scans.
- The Workspace (api/v1beta1/workspace_types.go, the CRD's storage version; webhook checks in
  workspace_validation.go): `resource.labelSelector` and `inference.preset.name` are required;
  `resource.instanceType` is required while node auto-provisioning is on (the default) and must be
  empty on BYO nodes; `metadata.name` a DNS-1123 label; `adapters[].source.name` a DNS-1123 name,
  with exactly one of image / volumeSource; at most 10 adapters; `strength` a number in [0, 1].
- The runtime: vLLM is the default (feature gate vLLM=true); it rejects `strength` ("vLLM does not
  support adapter strength", pkg/model/interface.go), so no strength is written. vLLM serves each
  /mnt/adapter/<name> folder as a LoRA module named <name> (presets/.../vllm/inference_api.py): clients
  ask for `"model": "<adapter name>"`. vLLM's LoRA loader refuses DoRA and `modules_to_save`, and
  adapters above its max_lora_rank (16 unless `--max-lora-rank`); a higher rank gets a ConfigMap
  (inference_config.yaml, `vllm: {max-lora-rank: N}`) referenced by `inference.config`.
- Preset names: the built-in short names (plugin.LegacyBuiltinToCatalog) and, since Kaito v0.9.0,
  any Hugging Face model id whose architecture vLLM supports ("Generic HuggingFace Models", best
  effort; Kaito downloads the weights from the Hub at start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from slmtune import atomic
from slmtune.config import RecipeError
from slmtune.methods import METHODS
from slmtune.models import CATALOG
from slmtune.training.rundir import RunDir

KAITO_VERSION = "v0.12.0"
KAITO_COMMIT = "056b8280b1a8debf644bc6f4399e913a1f9c7e70"
API_VERSION = "kaito.sh/v1beta1"

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
IMAGE_DATA_DIR = "/data"  # in the adapter image; Kaito's puller moves it to ADAPTER_MOUNT/<source.name>
ADAPTER_MOUNT = "/mnt/adapter"
DOCKERFILE = "Dockerfile"
WORKSPACE_FILE = "workspace.yaml"
README = "README.md"

# The smallest single-GPU SKU in Kaito's Azure list (NVIDIA A10, 24 GiB): enough for the small models
# slmtune trains; Kaito refuses a preset that does not fit, with the memory it needs.
DEFAULT_INSTANCE_TYPE = "Standard_NV36ads_A10_v5"
PLACEHOLDER_REGISTRY = "registry.example.com/slmtune"
HF_SECRET = "hf-token"  # a Secret with an HF_TOKEN key, for presets whose Hub repository is gated

# vLLM's LoRAConfig: max_lora_rank defaults to 16 and takes one of these values.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Kaito's built-in preset names -> the Hugging Face model each serves (pkg/utils/plugin/plugin.go,
# LegacyBuiltinToCatalog, at KAITO_COMMIT; ids as the Hub spells them).
PRESETS = {
    "phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k-instruct": "microsoft/Phi-3-mini-128k-instruct",
    "phi-3-medium-4k-instruct": "microsoft/Phi-3-medium-4k-instruct",
    "phi-3-medium-128k-instruct": "microsoft/Phi-3-medium-128k-instruct",
    "phi-3.5-mini-instruct": "microsoft/Phi-3.5-mini-instruct",
    "phi-4-mini-instruct": "microsoft/Phi-4-mini-instruct",
    "phi-4": "microsoft/phi-4",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.3-70b-instruct": "meta-llama/Llama-3.3-70B-Instruct",
    "qwen2.5-coder-7b-instruct": "Qwen/Qwen2.5-Coder-7B-Instruct",
    "qwen2.5-coder-32b-instruct": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "ministral-3-3b-instruct": "mistralai/Ministral-3-3B-Instruct-2512",
    "ministral-3-8b-instruct": "mistralai/Ministral-3-8B-Instruct-2512",
    "ministral-3-14b-instruct": "mistralai/Ministral-3-14B-Instruct-2512",
    "mistral-large-3-675b-instruct": "mistralai/Mistral-Large-3-675B-Instruct-2512",
    "gemma-3-4b-instruct": "google/gemma-3-4b-it",
    "gemma-3-27b-instruct": "google/gemma-3-27b-it",
    "deepseek-r1-distill-llama-8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "deepseek-r1-distill-qwen-14b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
    "deepseek-r1-0528": "deepseek-ai/DeepSeek-R1-0528",
    "deepseek-v3-0324": "deepseek-ai/DeepSeek-V3-0324",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
}
# Presets Kaito marks downloadAuthRequired (presets/workspace/models/supported_models.yaml); Meta's
# Hub repositories are gated for any Llama id given as a generic preset too.
GATED_PRESETS = {"llama-3.1-8b-instruct", "llama-3.3-70b-instruct"}
GATED_ORGS = ("meta-llama/",)
# slmtune's catalog names -> the Hub model they are a copy of.
CATALOG_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# org/name, as slmtune.models.resolve and Kaito's IsValidPreset take it
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A container image reference as Kaito's webhook parses it (github.com/distribution/reference).
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(rf"(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
                       r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The adapter's name becomes the init container `puller-<name>`, itself a DNS-1123 label (63 characters);
# the Workspace's becomes a StatefulSet whose pods' revision label must stay within 63 characters.
MAX_NAME = 40


class KaitoExportError(RecipeError):
    """The run cannot be served by Kaito as an adapter (the message says why and what to do)."""


@dataclass
class KaitoExport:
    path: Path  # Dockerfile, the adapter files, workspace.yaml, README.md
    preset: str
    image: str
    name: str  # the Workspace's and the adapter's name: clients ask for "model": name
    image_is_placeholder: bool


def supported_presets() -> str:
    return ", ".join(PRESETS)


def dns_label(text: str, limit: int = MAX_NAME) -> str:
    """`text` as a DNS-1123 label: lowercase letters, digits and '-', starting and ending alphanumeric."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return label or "adapter"


def preset_for(base: str, override: str | None = None) -> str:
    """Kaito's `inference.preset.name` for the run's base model (`override`: the user's choice, checked
    the way Kaito's webhook checks it: a built-in preset or a Hugging Face id)."""
    by_hub_id = {hf.lower(): name for name, hf in PRESETS.items()}
    if override:
        if override.lower() in PRESETS:
            return override.lower()
        if HUB_ID.fullmatch(override):
            return by_hub_id.get(override.lower(), override)
        raise KaitoExportError(f"--kaito-preset {override!r} is not a Kaito preset: give one of {supported_presets()}, "
                               "or a Hugging Face model id (org/name) whose architecture vLLM supports")
    hub_id = CATALOG_HUB_IDS.get(base)
    if hub_id is None and base not in CATALOG and not Path(base).expanduser().exists() and HUB_ID.fullmatch(base):
        hub_id = base
    if hub_id is None:
        kind = "a local folder" if Path(base).expanduser().exists() else "not a Hugging Face model id"
        raise KaitoExportError(
            f"base model {base!r} is {kind}; Kaito downloads the base by preset name, so it cannot tell which "
            f"model this is. Pass --kaito-preset NAME: one of Kaito's presets ({supported_presets()}), or the "
            "Hugging Face id this base was downloaded from (Kaito >= v0.9 serves any Hub model whose "
            "architecture vLLM supports)")
    return by_hub_id.get(hub_id.lower(), hub_id)


def max_lora_rank(config: dict) -> int | None:
    """The `--max-lora-rank` vLLM needs for this adapter (None: its default, 16, is enough)."""
    rank = int(config.get("r") or 0)
    if rank <= VLLM_DEFAULT_MAX_LORA_RANK:
        return None
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not fitting:
        raise KaitoExportError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]}): "
                               "export --format merged instead")
    return fitting[0]


def check_adapter(adapter_dir: Path) -> dict:
    """adapter_config.json of a LoRA adapter Kaito's default runtime (vLLM) can load; refuses the rest."""
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise KaitoExportError(f"{adapter_dir}: no {name}; Kaito's adapter image needs "
                                   f"{' and '.join(ADAPTER_FILES)}")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    peft_type = config.get("peft_type")
    merged = "export --format merged instead and serve it as a model of its own"
    if peft_type != "LORA":
        raise KaitoExportError(f"Kaito attaches LoRA adapters; this run's adapter is {peft_type}: {merged}")
    refusals = {"use_dora": "DoRA (vLLM, Kaito's default runtime, does not load DoRA adapters)",
                "modules_to_save": "an adapter that also trains whole modules (vLLM loads none)",
                "rank_pattern": "per-module ranks (vLLM scales every module by one lora_alpha / r)",
                "alpha_pattern": "per-module alphas (vLLM scales every module by one lora_alpha / r)"}
    for key, what in refusals.items():
        if config.get(key):
            raise KaitoExportError(f"{what} ({key} in adapter_config.json): {merged}")
    if str(config.get("init_lora_weights", "")).lower().startswith(("pissa", "olora")):
        raise KaitoExportError(f"this PiSSA/OLoRA adapter changes the base weights: {merged}")
    return config


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dockerfile() -> str:
    return (f"# Kaito adapter image ({KAITO_VERSION}, pkg/workspace/image/README.md): the PEFT files under "
            f"{IMAGE_DATA_DIR}.\n"
            f"# Kaito's puller init container unpacks the layers and moves {IMAGE_DATA_DIR} to "
            f"{ADAPTER_MOUNT}/<adapter name>,\n"
            "# where the inference server loads it. Nothing runs in this image, so it needs no base.\n"
            "FROM scratch\n"
            f"COPY {' '.join(ADAPTER_FILES)} {IMAGE_DATA_DIR}/\n")


def manifests(name: str, preset: str, image: str, instance_type: str, lora_rank: int | None) -> list[dict]:
    """The Kubernetes objects to apply, in order: a ConfigMap of vLLM arguments when the adapter needs
    one (the webhook looks it up when the Workspace is created), then the Workspace."""
    docs = []
    inference: dict = {"preset": {"name": preset}}
    if preset in GATED_PRESETS or preset.lower().startswith(GATED_ORGS):
        inference["preset"]["presetOptions"] = {"modelAccessSecret": HF_SECRET}
    if lora_rank is not None:
        config_name = f"{name}-inference-params"
        settings = {"vllm": {"cpu-offload-gb": 0, "max-lora-rank": lora_rank}}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": config_name},
                     "data": {"inference_config.yaml": yaml.safe_dump(settings, sort_keys=False)}})
        inference["config"] = config_name
    inference["adapters"] = [{"source": {"name": name, "image": image}}]
    resource: dict = {"instanceType": instance_type} if instance_type else {}
    resource["labelSelector"] = {"matchLabels": {"apps": name}}
    docs.append({"apiVersion": API_VERSION, "kind": "Workspace", "metadata": {"name": name},
                 "resource": resource, "inference": inference})
    return docs


def workspace_yaml(docs: list[dict], run_dir: Path, base: str) -> str:
    header = (f"# Kaito {KAITO_VERSION} ({API_VERSION}) Workspace serving the LoRA adapter of {run_dir.name}\n"
              f"# on {base}, written by `slmtune export --format kaito`.\n"
              f"# Apply with: kubectl apply -f {WORKSPACE_FILE}\n"
              "# Build and push the adapter image first (README.md). No `strength`: vLLM, Kaito's default runtime,\n"
              "# rejects it; with the annotation kaito.sh/runtime: transformers an adapter may set\n"
              "# strength: \"0.0\" to \"1.0\".\n")
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's inference_config.yaml) as literal blocks, readable and editable."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def readme(export: KaitoExport, base: str, docs: list[dict], adapter_sha: str) -> str:
    workspace = docs[-1]
    lines = [
        f"# Kaito adapter export of `{base}` + LoRA",
        "",
        f"Targets Kaito {KAITO_VERSION} (github.com/kaito-project/kaito, commit {KAITO_COMMIT[:12]}), API "
        f"`{API_VERSION}`. Generated from Kaito's sources; not run on a cluster by slmtune.",
        "",
        "| file | what |",
        "|---|---|",
        f"| `{DOCKERFILE}` | the adapter image: the two files below under `{IMAGE_DATA_DIR}/` |",
        f"| `{ADAPTER_FILES[0]}`, `{ADAPTER_FILES[1]}` | the run's PEFT adapter, byte for byte "
        f"(sha256 of the weights {adapter_sha}) |",
        f"| `{WORKSPACE_FILE}` | the Workspace (preset `{export.preset}`, adapter `{export.name}`)"
        + (" and the ConfigMap raising vLLM's max LoRA rank" if len(docs) > 1 else "") + " |",
        "",
        "```bash",
        f"docker build -t {export.image} .        # or podman build",
        f"docker push {export.image}",
        f"kubectl apply -f {WORKSPACE_FILE}",
        f"kubectl get workspace {export.name} -w      # until STATE is Ready (InferenceReady True)",
        f"kubectl port-forward svc/{export.name} 8000:80 &",
        "curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        f"  -d '{{\"model\": \"{export.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
        "```",
        "",
        f"vLLM serves the adapter as the model `{export.name}` (`GET /v1/models` lists what the server has).",
    ]
    if export.image_is_placeholder:
        lines += ["", f"**The image `{export.image}` is a placeholder**: re-export with `--kaito-image "
                  "REGISTRY/NAME:TAG`, or change it here and in the Workspace, to a registry the cluster can pull "
                  "from (a private one also needs `imagePullSecrets` under the adapter's `source`)."]
    instance = workspace["resource"].get("instanceType")
    lines += ["", (f"`resource.instanceType` is `{instance}` (re-export with `--kaito-instance-type SKU`; with "
                   "node auto-provisioning disabled, i.e. your own GPU nodes, pass `--kaito-instance-type ''`)."
                   if instance else "No `resource.instanceType`: for BYO GPU nodes (node auto-provisioning disabled); "
                   f"label them `apps={export.name}`.")]
    options = workspace["inference"]["preset"].get("presetOptions")
    if options:
        lines += ["", f"The base model's Hub repository is gated: create the Secret first, "
                  f"`kubectl create secret generic {HF_SECRET} --from-literal HF_TOKEN=hf_...`."]
    if "/" in export.preset:
        lines += ["", f"`{export.preset}` is not a built-in preset: Kaito (>= v0.9) serves it as a generic Hugging "
                  "Face model, best effort, with vLLM, downloading the weights from the Hub when the pod starts."]
    return "\n".join(lines) + "\n"


def export_kaito(run_dir: str | os.PathLike, out: str | os.PathLike, *, preset: str | None = None,
                 image: str | None = None, instance_type: str = DEFAULT_INSTANCE_TYPE) -> KaitoExport:
    """Write OUT: the adapter image's build context (Dockerfile + the PEFT files) and workspace.yaml.

    Everything is checked first and written in a temporary folder beside `out`, renamed at the end,
    so a refused export leaves nothing behind."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    run = RunDir(run_dir)
    recipe = run.recipe()
    if run.artifact().name != "adapter":
        raise KaitoExportError(
            f"{run_dir}: a full fine-tune has no adapter, and Kaito attaches adapters to a preset base. Use "
            "--format merged: upload that folder to the Hugging Face Hub and name its id as the Workspace's "
            "inference.preset.name (Kaito >= v0.9 serves Hub models whose architecture vLLM supports), or run "
            "it from your own image with inference.template")
    config = check_adapter(run.artifact())
    base = recipe.model.name
    preset_name = preset_for(base, preset)
    lora_rank = max_lora_rank(config)
    name = dns_label(run.path.resolve().name)
    adapter_sha = sha256(run.artifact() / ADAPTER_FILES[1])
    placeholder = not image
    image = image or f"{PLACEHOLDER_REGISTRY}/{name}:{adapter_sha[:12]}"
    if not IMAGE_REF.fullmatch(image) or len(image.split("@")[0].rsplit(":", 1)[0]) > 255:
        raise KaitoExportError(f"--kaito-image {image!r} is not a valid image reference (e.g. "
                               "myacr.azurecr.io/mine:v1; the repository path in lowercase)")
    if instance_type and not re.fullmatch(r"[\w.-]+", instance_type):
        raise KaitoExportError(f"--kaito-instance-type {instance_type!r}: expected a GPU SKU such as "
                               f"{DEFAULT_INSTANCE_TYPE}, or '' for your own (BYO) nodes")
    if METHODS[recipe.method.name].quantized_base:
        print("note: a QLoRA adapter was trained on the 4-bit base; Kaito serves it on the full-precision base, "
              "so its answers drift somewhat", file=sys.stderr)
    if base in CATALOG_HUB_IDS:
        print(f"note: slmtune's {base} is dequantized from a Q4_1 GGUF; Kaito downloads {CATALOG_HUB_IDS[base]}'s "
              "original weights, which differ slightly from the ones this adapter was trained on", file=sys.stderr)
    docs = manifests(name, preset_name, image, instance_type, lora_rank)
    export = KaitoExport(out, preset_name, image, name, placeholder)
    with atomic.directory(out) as work:
        for file in ADAPTER_FILES:
            shutil.copyfile(run.artifact() / file, work / file)
        if sha256(work / ADAPTER_FILES[1]) != adapter_sha:
            raise KaitoExportError(f"{ADAPTER_FILES[1]} changed while it was copied; export again")
        (work / DOCKERFILE).write_text(dockerfile())
        (work / WORKSPACE_FILE).write_text(workspace_yaml(docs, run.path.resolve(), base))
        (work / README).write_text(readme(export, base, docs, adapter_sha))
    return export
