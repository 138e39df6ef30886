"""`slmtune export --format kaito`: a Kaito adapter image build context and a Workspace YAML.

No cluster and no Kaito run here. The Workspace is checked against what Kaito v0.12.0 itself checks
(kaito-project/kaito at 056b8280b1a8): the v1beta1 CRD's fields and required ones
(config/crd/bases/kaito.sh_workspaces.yaml), the admission webhook's rules
(api/v1beta1/workspace_validation.go) and what the controller derives from the adapter's name
(the init container `puller-<name>`, pkg/workspace/manifests/manifests.go). The image layout is Kaito's
adapter image format (pkg/workspace/image/README.md): /data/adapter_config.json and
/data/adapter_model.safetensors, which the puller moves to /mnt/adapter/<name>; where podman is
installed the image is built and its layers unpacked as the puller does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from slmtune.cli import main
from slmtune.config import RecipeError
from slmtune.export import kaito
from slmtune.export.kaito import KaitoExportError, export_kaito, preset_for
from tests.conftest import chat_example, write_jsonl

# The v1beta1 CRD's properties at each level the export writes (config/crd/bases/kaito.sh_workspaces.yaml).
CRD_TOP = {"apiVersion", "kind", "metadata", "resource", "inference", "tuning", "status"}
CRD_RESOURCE = {"count", "instanceType", "labelSelector", "partition", "preferredNodes"}
CRD_LABEL_SELECTOR = {"matchLabels", "matchExpressions"}
CRD_INFERENCE = {"adapters", "config", "preset", "template"}
CRD_PRESET = {"accessMode", "name", "presetOptions"}
CRD_PRESET_OPTIONS = {"image", "imagePullSecrets", "modelAccessSecret"}
CRD_ADAPTER = {"source", "strength"}
CRD_SOURCE = {"image", "imagePullSecrets", "name", "urls", "volumeSource"}
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# distribution/reference's grammar, written out here apart from the module's own pattern.
IMAGE = re.compile(r"(?:[a-zA-Z0-9][a-zA-Z0-9.-]*(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                   r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::\w[\w.-]{0,127})?")


def check_workspace(ws: dict, *, nap: bool = True) -> None:
    """What Kaito's CRD schema and admission webhook require of an inference Workspace with image adapters
    on the default (vLLM) runtime."""
    assert ws["apiVersion"] == "kaito.sh/v1beta1" and ws["kind"] == "Workspace"
    assert set(ws) <= CRD_TOP
    name = ws["metadata"]["name"]
    assert DNS1123_LABEL.fullmatch(name) and len(name) <= 63  # Validate: IsDNS1123Label(w.Name)
    assert "tuning" not in ws and "inference" in ws  # "Either Inference or Tuning must be specified, but not both"
    resource = ws["resource"]
    assert set(resource) <= CRD_RESOURCE
    assert set(resource["labelSelector"]) <= CRD_LABEL_SELECTOR and resource["labelSelector"]["matchLabels"]
    for key, value in resource["labelSelector"]["matchLabels"].items():
        assert not key.startswith("kaito.sh/") and DNS1123_LABEL.fullmatch(value)  # reserved keys are ignored
    if nap:  # "instanceType is required when node auto-provisioning is enabled" (the default)
        assert resource["instanceType"]
    else:  # "instanceType must be empty when node auto-provisioning is disabled (BYO scenario)"
        assert not resource.get("instanceType")
    inference = ws["inference"]
    assert set(inference) <= CRD_INFERENCE
    assert "template" not in inference  # "Preset and Template cannot be set at the same time"
    preset = inference["preset"]
    assert set(preset) <= CRD_PRESET and set(preset.get("presetOptions", {})) <= CRD_PRESET_OPTIONS
    # plugin.IsValidPreset: a registered/legacy name, or a Hugging Face id "a/b"
    assert preset["name"] in kaito.PRESETS or re.fullmatch(r"[^/]+/[^/]+", preset["name"])
    adapters = inference["adapters"]
    assert 1 <= len(adapters) <= 10  # MaxAdaptersNumber
    assert len({a["source"]["name"] for a in adapters}) == len(adapters)  # no duplicate names
    for adapter in adapters:
        assert set(adapter) <= CRD_ADAPTER
        source = adapter["source"]
        assert set(source) <= CRD_SOURCE
        assert DNS1123_SUBDOMAIN.fullmatch(source["name"]) and len(source["name"]) <= 253
        puller = f"puller-{source['name']}"  # the init container Kaito names after the adapter
        assert DNS1123_LABEL.fullmatch(puller) and len(puller) <= 63
        assert "urls" not in source and "volumeSource" not in source  # exactly one source: the image
        assert IMAGE.fullmatch(source["image"])  # reference.ParseDockerRef
        assert "strength" not in adapter  # vLLM: "vLLM does not support adapter strength"


def read_manifests(out: Path) -> list[dict]:
    return list(yaml.safe_load_all((out / kaito.WORKSPACE_FILE).read_text()))


def train(root: Path, base: Path, method: dict) -> Path:
    from slmtune.config import recipe_from_dict
    from slmtune.training.run import run

    data = write_jsonl(root / "train.jsonl", [chat_example(f"What is fact number {i}?", f"Fact {i} is {i} hours.")
                                              for i in range(8)])
    run(recipe_from_dict({
        "model": {"name": str(base)}, "method": method, "data": {"train": str(data), "max_length": 64},
        "train": {"micro_batch_size": 4, "learning_rate": 1e-3, "seed": 1, "precision": "fp32", "max_steps": 1},
        "output": {"dir": str(root / "run")},
    }), progress=False)
    return root / "run"


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_the_export_is_an_image_build_context_and_a_workspace_kaito_accepts(lora_run, tmp_path):
    out = tmp_path / "kaito"
    result = export_kaito(lora_run, out, preset="phi-3-mini-4k-instruct")
    assert result.path == out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["Dockerfile", "README.md", "adapter_config.json", "adapter_model.safetensors", "workspace.yaml"])
    assert leftovers(tmp_path) == []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (lora_run / "adapter" / name).read_bytes()

    # Kaito's adapter image: the two files under /data (its puller moves /data to /mnt/adapter/<name>)
    lines = [ln for ln in (out / "Dockerfile").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == ["FROM scratch", "COPY adapter_config.json adapter_model.safetensors /data/"]

    (workspace,) = read_manifests(out)  # rank 4: vLLM's default max LoRA rank (16) is enough, no ConfigMap
    check_workspace(workspace)
    assert workspace["inference"]["preset"] == {"name": "phi-3-mini-4k-instruct"}
    assert "config" not in workspace["inference"]
    (adapter,) = workspace["inference"]["adapters"]
    assert adapter["source"]["name"] == result.name == workspace["metadata"]["name"] == "run"
    assert workspace["resource"] == {"instanceType": kaito.DEFAULT_INSTANCE_TYPE,
                                     "labelSelector": {"matchLabels": {"apps": "run"}}}
    # no --kaito-image: a placeholder tagged with the adapter's content hash, flagged in the README
    assert result.image_is_placeholder and adapter["source"]["image"] == result.image
    assert result.image.startswith(kaito.PLACEHOLDER_REGISTRY + "/run:")
    assert kaito.sha256(out / "adapter_model.safetensors").startswith(result.image.rsplit(":", 1)[1])
    readme = (out / "README.md").read_text()
    assert "placeholder" in readme and kaito.KAITO_VERSION in readme and '"model": "run"' in readme


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman to build the image")
def test_the_image_builds_and_unpacks_to_the_adapter_the_way_kaitos_puller_does(lora_run, tmp_path):
    """podman builds the context; its layers are untarred into one root as puller.sh does, whose /data
    Kaito then moves to /mnt/adapter/<name>: it must hold the run's adapter files, byte for byte."""
    out = tmp_path / "kaito"
    export_kaito(lora_run, out, preset="phi-4")
    tag = f"localhost/slmtune-kaito-test:{uuid.uuid4().hex[:12]}"
    try:
        subprocess.run(["podman", "build", "-q", "-t", tag, str(out)], check=True, capture_output=True, timeout=300)
        subprocess.run(["podman", "save", "--format", "oci-dir", "-o", str(tmp_path / "layout"), tag], check=True,
                       capture_output=True, timeout=300)
    finally:
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True, timeout=120)
    layout = tmp_path / "layout"
    index = json.loads((layout / "index.json").read_text())
    blob = lambda digest: layout / "blobs" / digest.replace(":", "/")  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    rootfs = tmp_path / "rootfs"
    for layer in manifest["layers"]:
        with tarfile.open(blob(layer["digest"])) as tar:
            tar.extractall(rootfs, filter="data")
    files = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file())
    assert files == ["data/adapter_config.json", "data/adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (rootfs / "data" / name).read_bytes() == (lora_run / "adapter" / name).read_bytes()


def test_the_cli_writes_the_image_the_user_names(lora_run, tmp_path, capsys):
    out = tmp_path / "kaito"
    assert main(["export", str(lora_run), "--format", "kaito", "--kaito-preset", "Qwen/Qwen2.5-0.5B-Instruct",
                 "--kaito-image", "myacr.azurecr.io/slm/run:v1", "--kaito-instance-type", "", "--output",
                 str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "placeholder" not in captured.err
    (workspace,) = read_manifests(out)
    check_workspace(workspace, nap=False)
    assert "instanceType" not in workspace["resource"]
    assert workspace["inference"]["preset"] == {"name": "Qwen/Qwen2.5-0.5B-Instruct"}
    assert workspace["inference"]["adapters"][0]["source"]["image"] == "myacr.azurecr.io/slm/run:v1"
    assert "generic Hugging Face model" in (out / "README.md").read_text()


def test_kaito_options_belong_to_the_kaito_format(lora_run, tmp_path, capsys):
    assert main(["export", str(lora_run), "--format", "gguf", "--kaito-preset", "phi-4",
                 "--output", str(tmp_path / "o")]) == 2
    assert "apply to --format kaito" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--format", "kaito", "--kaito-preset", "phi-4", "--precision", "int8",
                 "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_a_base_kaito_cannot_name_is_refused_and_leaves_nothing(lora_run, tmp_path):
    out = tmp_path / "kaito"
    with pytest.raises(KaitoExportError) as err:  # the tiny base is a local folder: no Hub id, no preset
        export_kaito(lora_run, out)
    message = str(err.value)
    base = yaml.safe_load((lora_run / "recipe.yaml").read_text())["model"]["name"]
    assert base in message and "--kaito-preset" in message and "phi-3-mini-4k-instruct" in message
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(KaitoExportError, match="not a Kaito preset: give one of phi-3-mini-4k-instruct"):
        export_kaito(lora_run, out, preset="smollm2")
    with pytest.raises(KaitoExportError, match="not a valid image reference"):
        export_kaito(lora_run, out, preset="phi-4", image="Registry/Mine:v1")
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_existing_output_is_left_alone_and_a_failed_write_leaves_nothing(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "kaito"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RecipeError, match="exists and is not empty"):
        export_kaito(lora_run, out, preset="phi-4")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(kaito, "readme", broken)  # the last file written
    with pytest.raises(OSError, match="disk full"):
        export_kaito(lora_run, tmp_path / "other", preset="phi-4")
    assert not (tmp_path / "other").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("base,preset", [
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k-instruct"),
    ("MICROSOFT/phi-4", "phi-4"),
    ("Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2.5-coder-7b-instruct"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),  # no built-in preset: Kaito's generic Hub path
    ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # slmtune's catalog name
])
def test_base_models_map_to_kaito_presets(base, preset):
    assert preset_for(base) == preset
    assert preset_for("/some/local/dir", "Phi-3.5-mini-instruct") == "phi-3.5-mini-instruct"
    assert preset_for("/some/local/dir", "microsoft/phi-3.5-mini-instruct") == "phi-3.5-mini-instruct"
    assert preset_for("/some/local/dir", "HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_gated_bases_name_the_hf_token_secret():
    (workspace,) = kaito.manifests("mine", "llama-3.1-8b-instruct", "r.io/mine:v1", "Standard_NC24ads_A100_v4", None)
    check_workspace(workspace)
    assert workspace["inference"]["preset"]["presetOptions"] == {"modelAccessSecret": kaito.HF_SECRET}
    (workspace,) = kaito.manifests("mine", "meta-llama/Llama-3.2-1B-Instruct", "r.io/mine:v1", "X", None)
    assert workspace["inference"]["preset"]["presetOptions"] == {"modelAccessSecret": kaito.HF_SECRET}


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory, tiny_llama_dir):
    """One-step runs on the tiny Llama: a full fine-tune, a DoRA adapter and a rank-32 LoRA."""
    root = tmp_path_factory.mktemp("kaito-runs")
    methods = {"full": {"name": "full"}, "dora": {"name": "dora", "lora_r": 4, "lora_alpha": 8},
               "rank32": {"name": "lora", "lora_r": 32, "lora_alpha": 32}}
    runs = {}
    for key, method in methods.items():
        (root / key).mkdir()
        runs[key] = train(root / key, tiny_llama_dir, method)
    return runs


def test_a_full_fine_tune_is_refused_with_the_merged_route(other_runs, tmp_path):
    with pytest.raises(KaitoExportError, match="full fine-tune has no adapter.*--format merged"):
        export_kaito(other_runs["full"], tmp_path / "kaito", preset="phi-4")
    assert list(tmp_path.iterdir()) == []


def test_a_dora_adapter_is_refused(other_runs, tmp_path):
    with pytest.raises(KaitoExportError, match="DoRA"):
        export_kaito(other_runs["dora"], tmp_path / "kaito", preset="phi-4")
    assert list(tmp_path.iterdir()) == []


def test_a_rank_above_vllms_default_gets_a_configmap_applied_first(other_runs, tmp_path):
    out = tmp_path / "kaito"
    export_kaito(other_runs["rank32"], out, preset="phi-4-mini-instruct")
    config_map, workspace = read_manifests(out)
    check_workspace(workspace)
    assert config_map["apiVersion"] == "v1" and config_map["kind"] == "ConfigMap"
    assert workspace["inference"]["config"] == config_map["metadata"]["name"]
    settings = yaml.safe_load(config_map["data"]["inference_config.yaml"])  # Kaito's InferenceConfig
    assert settings["vllm"]["max-lora-rank"] == 32
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 32
    assert kaito.max_lora_rank({"r": 16}) is None and kaito.max_lora_rank({"r": 100}) == 128
    with pytest.raises(KaitoExportError, match="above vLLM's largest"):
        kaito.max_lora_rank({"r": 1024})
