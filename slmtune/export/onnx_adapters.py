"""LoRA adapters as files of their own over one shared ONNX base (onnxruntime-genai's `.onnx_adapter`).

    slmtune export runs/a --format onnx-base --output exports/base-onnx               # once per base model
    slmtune export runs/a --format onnx-adapter --base-onnx exports/base-onnx --output exports/a-onnx
    slmtune export runs/b --format onnx-adapter --base-onnx exports/base-onnx --output exports/b-onnx
    slmtune serve --backend onnx --model exports/base-onnx --adapter a=exports/a-onnx --adapter b=exports/b-onnx

**The base** (`export_onnx_base`): onnxruntime-genai's model builder, given the run's base model and
its PEFT adapter (`--extra_options adapter_path=...`), emits for every adapted projection the
subgraph x·W + (x·A)·(s·B), A and s·B as initializers (s = PEFT's scaling, multiplied into B by the
builder). The export then turns each of those A/B weights into an optional graph input whose rank
dimension is symbolic, with a zero-rank initializer of the same name as its default: with no adapter
fed, (x·A)·B is an empty sum (zeros) and the model is the plain base model; an adapter of any rank
feeds its own A and B by name. The run's own LoRA numbers are zeroed in the external data file, so
the base carries no fine-tune. `lora_slots.json` records which PEFT module feeds which inputs (and,
for a packed PEFT module such as Phi-3's qkv_proj, which rows of B go to q/k/v), the base model and
the input shapes; the mapping is checked at build time against the builder's own initializers.

**An adapter** (`export_onnx_adapter`): the run's LoRA weights read from PEFT (A, and B times its
scaling, per module, so rsLoRA and per-module ranks/alphas come out as PEFT applies them), transposed
to the base's input layout and written with onnxruntime's `AdapterFormat` as OUT/adapter.onnx_adapter,
with OUT/adapter.json (base model, modules, ranks). Refused with the reason: a run trained on another
base model, modules the base has no LoRA inputs for, shapes that differ, DoRA / trained biases /
modules_to_save / LoRA on embeddings (not of the x·A·B form), full fine-tunes.

At run time (onnxruntime-genai): `adapters = og.Adapters(model); adapters.load(file, name)`, then
`generator.set_active_adapter(adapters, name)` per Generator, i.e. per row in our decoder, so rows of
different adapters decode side by side (slmtune/serve/onnx_engine.py).

Parity, as for the merged export (slmtune/export/parity.py): the base without an adapter against the
plain base model in PyTorch (BASE/parity.json), and the base with the adapter against the run in
PyTorch (OUT/parity.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from slmtune import atomic
from slmtune.config import RecipeError
from slmtune.export.onnx import PRECISIONS, ExportError, ExportResult, OnnxCandidate, build_onnx, publish
from slmtune.export.parity import PARITY_MAX_NEW_TOKENS, parity
from slmtune.training.rundir import RunDir

SLOTS_FILE = "lora_slots.json"  # in a base export: the LoRA inputs and which PEFT module feeds them
ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_INFO = "adapter.json"
BASE_FORMAT = "slmtune-onnx-lora-base"
ADAPTER_FORMAT = "slmtune-onnx-lora-adapter"
FORMAT_VERSION = 1

# The builder's LoRA MatMuls: /model/layers.0/attn/q_proj/lora_A/MatMul (lora_B likewise; _Q8/_Q4 when
# quantized to MatMulNBits).
LORA_NODE = re.compile(r"^/(?P<module>.+)/lora_(?P<side>[AB])/MatMul(?:_Q\d+)?$")
LAYER = re.compile(r"(?:^|[./])layers\.(\d+)(?=[./]|$)")
# PEFT modules the builder splits into several ONNX projections (A shared, B's rows split in order).
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def module_key(name: str, sep: str) -> tuple[int | None, str]:
    """(layer index or None, last name part): what an ONNX module path and a PEFT module name share,
    e.g. "model/layers.3/attn/q_proj" and "model.layers.3.self_attn.q_proj" are both (3, "q_proj")."""
    match = LAYER.search(name)
    return (int(match.group(1)) if match else None, name.split(sep)[-1])


# --- the run's LoRA weights -------------------------------------------------------------------
def lora_model(run_dir: str | os.PathLike):
    """(PeftModel on the full-precision base, tokenizer, recipe) of a LoRA run; ExportError otherwise."""
    from peft import PeftModel

    from slmtune.models import load_model, load_tokenizer

    run = RunDir(run_dir)
    recipe = run.recipe()
    kind = run.artifact_kind()
    if kind is None:
        raise ExportError(f"{run_dir}: the run has not finished (no adapter/ yet)")
    if kind != "adapter":
        raise ExportError(f"{run_dir}: a full fine-tune has no adapter; use --format onnx (the whole model)")
    config = json.loads((run.artifact() / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{run_dir}: a {config.get('peft_type')} adapter; ONNX adapters are LoRA (lora, qlora "
                          "runs): use --format onnx (merged)")
    if config.get("modules_to_save"):
        raise ExportError(f"{run_dir}: the adapter also trains whole modules ({', '.join(config['modules_to_save'])}), "
                          "which a shared base cannot take: use --format onnx (merged)")
    model = PeftModel.from_pretrained(load_model(recipe.model.name), str(run.artifact()))
    model.eval()
    return model, load_tokenizer(recipe.model.name), recipe


def lora_weights(peft_model) -> dict[str, tuple]:
    """{module name: (A [r, in], s·B [out, r])} as float32 torch tensors, for every LoRA layer of the
    model's active adapter; s is the layer's own PEFT scaling (alpha/r, rsLoRA, per-module patterns)."""
    from peft.tuners.lora import LoraLayer

    name = peft_model.active_adapter
    weights = {}
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.scaling:
            continue
        if name in getattr(module, "lora_embedding_A", {}):
            raise ExportError(f"{module_name}: LoRA on an embedding has no ONNX adapter form; use --format onnx")
        if getattr(module, "use_dora", {}).get(name):
            raise ExportError(f"{module_name}: DoRA's magnitude vectors have no ONNX adapter form; use --format onnx")
        variant = getattr(module, "lora_variant", {}).get(name)
        if variant is not None:  # DoRA and PEFT's other variants: not x·A·B
            raise ExportError(f"{module_name}: a {type(variant).__name__} LoRA is not of the x·A·B form an ONNX "
                              "adapter applies; use --format onnx (merged)")
        if getattr(module, "lora_bias", {}).get(name):
            raise ExportError(f"{module_name}: the adapter trains a bias; use --format onnx (merged)")
        a = module.lora_A[name].weight.detach().float()
        b = module.lora_B[name].weight.detach().float() * module.scaling[name]  # as the model builder does
        weights[module_name] = (a, b)
    if not weights:
        raise ExportError("the adapter has no LoRA layers")
    return weights


# --- the base: LoRA weights as optional inputs --------------------------------------------------
def open_lora_inputs(export_dir: Path) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Turn the builder's LoRA MatMuls in EXPORT_DIR/model.onnx into MatMuls on optional graph inputs
    named `<module path>.lora_A.MatMul.weight` / `.lora_B...` ([in, r] and [r, out], r symbolic, one
    name per pair; defaults: zero-rank initializers), and zero the run's LoRA bytes in the external
    data file. A quantized base (int8/int4) has them as MatMulNBits: they become float MatMuls, the
    base weights stay quantized. Returns the slots ({"module", "A", "B", "in", "out"}) and the
    builder's float values (none for a quantized base), which `check_mapping` compares with ours."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = export_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    pairs: dict[str, dict] = {}
    for node in graph.node:
        match = LORA_NODE.match(node.name)
        if match is None:
            continue
        float_weight = node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers
        if not float_weight and node.op_type != "MatMulNBits":
            raise ExportError(f"{node.name}: a {node.op_type} LoRA node this export cannot open (an "
                              "onnxruntime-genai builder it does not know)")
        pairs.setdefault(match.group("module"), {})[match.group("side")] = node
    if not pairs:
        raise ExportError("the model builder emitted no LoRA MatMuls (did it get the adapter?)")
    slots, values, old, defaults = [], {}, [], []
    value_infos = {v.name: v for v in graph.value_info}
    for i, (module, pair) in enumerate(sorted(pairs.items())):
        if set(pair) != {"A", "B"}:
            raise ExportError(f"/{module}: half a LoRA pair in the built model")
        rank_dim = f"lora_r_{i}"
        shapes, names = {}, {}
        for side, node in pair.items():
            name = names[side] = f"{module.replace('/', '.')}.lora_{side}.MatMul.weight"
            if node.op_type == "MatMul":
                weight = initializers[node.input[1]]
                values[name] = numpy_helper.to_array(weight, base_dir=str(export_dir))
                shapes[side] = list(weight.dims)
                dtype = values[name].dtype
            else:  # MatMulNBits(x, quantized weight, scales[, zero points...]) with K and N attributes
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                shapes[side] = [int(attrs["K"]), int(attrs["N"])]
                dtype = np.float32
            old.extend(initializers[n] for n in node.input[1:] if n in initializers)
            empty = list(shapes[side])
            empty[1 if side == "A" else 0] = 0
            default = numpy_helper.from_array(np.zeros(empty, dtype=dtype), name)
            defaults.append(default)
            dims = [shapes[side][0], rank_dim] if side == "A" else [rank_dim, shapes[side][1]]
            graph.input.append(helper.make_tensor_value_info(name, default.data_type, dims))
            root = node.input[0]
            node.ClearField("input")
            node.input.extend([root, name])
            node.ClearField("attribute")
            node.op_type, node.domain, node.name = "MatMul", "", f"/{module}/lora_{side}/MatMul"
            # The builder declared the rank of x·A as a number: make it the symbolic rank.
            info = value_infos.get(node.output[0]) if side == "A" else None
            if info is not None and info.type.tensor_type.HasField("shape"):
                last = info.type.tensor_type.shape.dim[-1]
                last.Clear()
                last.dim_param = rank_dim
        slots.append({"module": module, "A": names["A"], "B": names["B"], "in": shapes["A"][0],
                      "out": shapes["B"][1]})
    # The builder's LoRA weights go (each is used by its LoRA node alone), the defaults come in.
    stale = []
    for tensor in old:
        if tensor.data_location == TensorProto.EXTERNAL:
            stale.append({e.key: e.value for e in tensor.external_data})
        graph.initializer.remove(tensor)
    graph.initializer.extend(defaults)
    used = {name for node in graph.node for name in node.input} - {d.name for d in defaults}
    if any(t.name in used for t in old):
        raise ExportError("a LoRA weight of the built model is shared with other nodes; cannot open it")
    onnx.save(model, str(path))
    for entry in stale:  # the run's LoRA numbers: not part of a shared base
        with open(export_dir / entry["location"], "r+b") as data:
            data.seek(int(entry.get("offset", 0)))
            data.write(bytes(int(entry["length"])))
    return slots, values


def map_modules(module_names, slots: list[dict]) -> dict[str, list[dict]]:
    """{PEFT module: [{"A", "B", "rows": [start, end]}, ...]}: which base inputs each module feeds
    (several for a packed module, each its rows of B). ExportError for a module with no inputs."""
    by_key = {module_key(s["module"], "/"): s for s in slots}
    mapping, missing = {}, []
    for name in module_names:
        layer, leaf = module_key(name, ".")
        parts = [by_key.get((layer, leaf))]
        if parts[0] is None and leaf in PACKED:
            parts = [by_key.get((layer, p)) for p in PACKED[leaf]]
        if any(p is None for p in parts):
            missing.append(name)
            continue
        start, entries = 0, []
        for part in parts:
            entries.append({"A": part["A"], "B": part["B"], "rows": [start, start + part["out"]]})
            start += part["out"]
        mapping[name] = entries
    if missing:
        raise ExportError(f"no LoRA inputs in the ONNX model for {', '.join(missing)}")
    return mapping


def adapter_parameters(weights: dict[str, tuple], mapping: dict[str, list[dict]],
                       shapes: dict[str, list]) -> dict[str, np.ndarray]:
    """The base inputs' values for one adapter: A transposed ([in, r]) and s·B's rows transposed
    ([r, out]); shapes (the base's, "r" for the rank) are checked."""
    params = {}
    for module, (a, b) in weights.items():
        entries = mapping[module]
        rows = entries[-1]["rows"][1]
        if b.shape[0] != rows or a.shape[1] != shapes[entries[0]["A"]][0]:
            raise ExportError(f"{module}: the adapter's weights are {tuple(a.shape[::-1])} / {tuple(b.shape)} but the "
                              f"base's LoRA inputs take {shapes[entries[0]['A']][0]} inputs and {rows} outputs: "
                              "another model's adapter")
        for entry in entries:
            start, end = entry["rows"]
            params[entry["A"]] = np.ascontiguousarray(a.numpy().T)
            params[entry["B"]] = np.ascontiguousarray(b[start:end].numpy().T)
    return params


def check_mapping(weights: dict[str, tuple], mapping: dict[str, list[dict]], shapes: dict[str, list],
                  built: dict[str, np.ndarray]) -> None:
    """Our layout of the run's adapter must feed every LoRA input of the base and be the builder's,
    number for number (`built`: its float weights; a quantized base has none to compare): the
    build-time proof that `map_modules` reads the builder's names (and packed splits) right."""
    ours = adapter_parameters(weights, mapping, shapes)
    if set(ours) != set(shapes):
        unfed, extra = sorted(set(shapes) - set(ours)), sorted(set(ours) - set(shapes))
        raise ExportError(f"the ONNX model's LoRA inputs and the adapter's modules do not match up (unfed: "
                          f"{', '.join(unfed[:4]) or '-'}; extra: {', '.join(extra[:4]) or '-'})")
    for name, value in built.items():
        if value.shape != ours[name].shape or not np.allclose(value, ours[name], rtol=1e-6, atol=1e-7):
            raise ExportError(f"{name}: the model builder's LoRA weight is not the adapter's as slmtune lays it out "
                              "(an onnxruntime-genai builder this export does not know)")


# --- base info ---------------------------------------------------------------------------------
def model_identity(name: str) -> tuple[str, str] | None:
    """("path", resolved folder) for a catalog name or an existing folder, ("name", hub id) for a hub id,
    None when it cannot be told from here (a relative path that does not exist here)."""
    from slmtune.models import CATALOG, models_dir

    path = Path(name).expanduser()
    if name in CATALOG:
        return ("path", str((models_dir() / name).resolve()))
    if path.exists():
        return ("path", str(path.resolve()))
    return None if path.is_absolute() or name.startswith(".") else ("name", name)


def read_base_info(base_dir: str | os.PathLike) -> dict | None:
    """BASE/lora_slots.json of a `--format onnx-base` export; None for an export without LoRA inputs."""
    file = Path(base_dir) / SLOTS_FILE
    if not file.is_file():
        return None
    info = json.loads(file.read_text())
    if info.get("format") != BASE_FORMAT or info.get("version") != FORMAT_VERSION:
        raise ExportError(f"{file}: not a LoRA base description this slmtune reads (format "
                          f"{info.get('format')!r} version {info.get('version')!r})")
    return info


def require_base_info(base_dir: str | os.PathLike) -> dict:
    base_dir = Path(base_dir)
    if not (base_dir / "genai_config.json").is_file():
        raise ExportError(f"{base_dir}: not an ONNX export (no genai_config.json); make the base with "
                          "`slmtune export RUN_DIR --format onnx-base --output DIR`")
    info = read_base_info(base_dir)
    if info is None:
        raise ExportError(f"{base_dir}: an ONNX export without LoRA inputs (its adapter merged?); make a base that "
                          "takes adapters with `slmtune export RUN_DIR --format onnx-base --output DIR`")
    return info


def identity_of(record: dict) -> tuple[str, str] | None:
    """The base model's identity as a base/adapter description recorded it when it was written (a
    relative path is only meaningful from where it was written), else as it reads from here."""
    recorded = record.get("base_identity")
    return tuple(recorded) if recorded else model_identity(record["base_model"])


def same_base(a: tuple[str, str] | None, b: tuple[str, str] | None) -> bool:
    """Whether two model identities (`model_identity`) are one model, as far as can be told."""
    if a is None or b is None or a[0] != b[0]:
        return True  # cannot tell (a relative path from elsewhere, a hub id against a folder)
    return a == b


# --- the exports -------------------------------------------------------------------------------
def _builder_input(recipe, work: Path) -> Path:
    """A local Hugging Face folder of the run's base model (the builder runs offline)."""
    from slmtune.models import load_model, load_tokenizer, resolve

    local = Path(resolve(recipe.model.name))
    if (local / "config.json").is_file():
        return local
    out = work / "hf-base"
    load_model(recipe.model.name).save_pretrained(out, safe_serialization=True)
    load_tokenizer(recipe.model.name).save_pretrained(out)
    return out


def export_onnx_base(run_dir: str | os.PathLike, out: str | os.PathLike, precision: str = "fp32", *,
                     check_parity: bool = True, prompts: list[str] | None = None,
                     max_new_tokens: int = PARITY_MAX_NEW_TOKENS,
                     builder_options: dict[str, str] | None = None) -> ExportResult:
    """Build the run's base model as an ONNX model with LoRA inputs for the modules the run adapts
    (its adapter's numbers are not kept), and check, without an adapter, parity with the plain base."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if builder_options and "adapter_path" in builder_options:
        raise ExportError("--builder-option adapter_path: the base export sets it (to the run's adapter)")
    model, tokenizer, recipe = lora_model(run_dir)
    weights = lora_weights(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        options = dict(builder_options or {}) | {"adapter_path": str(RunDir(run_dir).artifact().resolve())}
        built = build_onnx(_builder_input(recipe, work), work / "onnx", precision, work_dir=work,
                           builder_options=options)
        slots, built_values = open_lora_inputs(built)
        shapes = {}
        for slot in slots:
            shapes[slot["A"]], shapes[slot["B"]] = [slot["in"], "r"], ["r", slot["out"]]
        mapping = map_modules(weights, slots)
        check_mapping(weights, mapping, shapes, built_values)
        info = {
            "format": BASE_FORMAT, "version": FORMAT_VERSION,
            "base_model": recipe.model.name, "base_identity": model_identity(recipe.model.name),
            "built_from_run": str(Path(run_dir).resolve()), "precision": precision,
            "target_modules": sorted({module_key(m, ".")[1] for m in weights}),
            "modules": mapping, "inputs": shapes,
        }
        atomic.write_text(built / SLOTS_FILE, json.dumps(info, indent=2) + "\n")
        report = None
        if check_parity:
            with model.disable_adapter():  # the plain base model, from the weights already loaded
                report = parity(recipe.model.name, built, OnnxCandidate(built), "onnx-base", prompts=prompts,
                                max_new_tokens=max_new_tokens, reference=(model, tokenizer))
        publish(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportResult(out, report)


def write_onnx_adapter(params: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """An `.onnx_adapter` file (onnxruntime's LoRA adapter format, flatbuffers) holding `params`."""
    import onnxruntime as ort

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(FORMAT_VERSION)
    adapter.set_model_version(FORMAT_VERSION)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in params.items()})
    adapter.export_adapter(str(path))
    return Path(path)


def _adapter_values(path: str | os.PathLike) -> dict:
    import onnxruntime as ort

    try:
        return dict(ort.AdapterFormat.read_adapter(str(path)).get_parameters())
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise ExportError(f"{path}: not a readable ONNX adapter file ({err})") from None


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of an `.onnx_adapter` file, by name."""
    return {name: np.array(value.numpy()) for name, value in _adapter_values(path).items()}


def check_adapter_fits(params: dict[str, tuple], info: dict, where: str) -> None:
    """An adapter's parameter shapes ({name: shape}) against a base's LoRA inputs: every name an input,
    every fixed dimension equal, A and B of a pair of one rank. ExportError naming the first misfit."""
    inputs = info["inputs"]
    unknown = sorted(set(params) - set(inputs))
    if unknown:
        raise ExportError(f"{where}: {len(unknown)} tensors the base has no LoRA input for (e.g. {unknown[0]}): "
                          "an adapter for another base, or for modules this base was not built with")
    for name, shape in params.items():
        want = inputs[name]
        if len(shape) != 2 or any(w != "r" and w != s for w, s in zip(want, shape)):
            raise ExportError(f"{where}: {name} is {list(shape)}, the base takes {want} (r: any rank): an adapter "
                              "for another model")
    for entries in info["modules"].values():
        for entry in entries:
            a, b = params.get(entry["A"]), params.get(entry["B"])
            if (a is None) != (b is None) or (a is not None and a[1] != b[0]):
                raise ExportError(f"{where}: {entry['A']} and {entry['B']} are not one LoRA pair")


def export_onnx_adapter(run_dir: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike, *,
                        check_parity: bool = True, prompts: list[str] | None = None,
                        max_new_tokens: int = PARITY_MAX_NEW_TOKENS) -> ExportResult:
    """Write the run's LoRA adapter as OUT/adapter.onnx_adapter for the base export BASE, and check
    parity: BASE with the adapter against the run in PyTorch."""
    out, base = Path(out), Path(base)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out}: exists and is not empty")
    info = require_base_info(base)
    recipe = RunDir(run_dir).recipe()
    if not same_base(model_identity(recipe.model.name), identity_of(info)):
        raise ExportError(f"{run_dir} was trained on {recipe.model.name!r}, but the ONNX base {base} was built from "
                          f"{info['base_model']!r}: an adapter only fits the base model it was trained on")
    model, tokenizer, recipe = lora_model(run_dir)
    weights = lora_weights(model)
    try:
        mapping = {m: info["modules"][m] for m in weights}
    except KeyError:
        missing = sorted(set(weights) - set(info["modules"]))
        raise ExportError(
            f"{run_dir} adapts {len(missing)} modules the ONNX base {base} has no LoRA inputs for (e.g. {missing[0]}); "
            f"the base was built from a run adapting {', '.join(info['target_modules'])}: rebuild the base "
            "(--format onnx-base) from a run whose target_modules cover this one's") from None
    params = adapter_parameters(weights, mapping, info["inputs"])
    check_adapter_fits({n: v.shape for n, v in params.items()}, info, str(run_dir))
    from slmtune.methods import METHODS

    if METHODS[recipe.method.name].quantized_base:
        print("note: a QLoRA adapter was trained on the 4-bit base; over a full-precision ONNX base its answers "
              "drift (parity says how much)", file=sys.stderr)
    report = None
    with atomic.directory(out) as work:
        write_onnx_adapter(params, work / ADAPTER_FILE)
        ranks = {m: int(a.shape[0]) for m, (a, _) in weights.items()}
        atomic.write_text(work / ADAPTER_INFO, json.dumps({
            "format": ADAPTER_FORMAT, "version": FORMAT_VERSION, "base_model": recipe.model.name,
            "base_identity": model_identity(recipe.model.name), "run": str(Path(run_dir).resolve()),
            "base_export": str(base.resolve()), "modules": sorted(weights), "ranks": ranks,
        }, indent=2) + "\n")
        if check_parity:
            candidate = OnnxCandidate(base, adapter_file=work / ADAPTER_FILE)
            report = parity(run_dir, work, candidate, "onnx-adapter", prompts=prompts, max_new_tokens=max_new_tokens,
                            reference=(model, tokenizer))
            del candidate  # its generators and adapters, before the folder is renamed
    return ExportResult(out, report)


# --- serving: an adapter file for a base ------------------------------------------------------
def onnx_adapter_file(path: str | os.PathLike, base_info: dict) -> Path:
    """The `.onnx_adapter` at PATH (the file, or an `--format onnx-adapter` folder holding one),
    checked against the base's LoRA inputs (and, when adapter.json says, its base model).
    ExportError with the reason otherwise."""
    given = Path(path).expanduser()
    file = given / ADAPTER_FILE if given.is_dir() else given
    if not file.is_file():
        raise ExportError(f"{given}: no ONNX adapter there (the ONNX backend serves adapters exported with "
                          "`slmtune export RUN_DIR --format onnx-adapter --base-onnx BASE --output DIR`)")
    sidecar = file.parent / ADAPTER_INFO
    if sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportError(f"{sidecar}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("base_model") or "", str):
            raise ExportError(f"{sidecar}: expected a JSON object (base model, modules, ranks)")
        try:
            other_base = bool(record.get("base_model")) and not same_base(identity_of(record), identity_of(base_info))
        except (TypeError, ValueError, KeyError) as err:
            raise ExportError(f"{sidecar}: a base identity this server cannot read ({err})") from None
        if other_base:
            raise ExportError(f"{given} is an adapter for {record['base_model']!r}, but this base was built from "
                              f"{base_info['base_model']!r}")
    check_adapter_fits({n: tuple(v.shape()) for n, v in _adapter_values(file).items()}, base_info, str(given))
    return file.resolve()


__all__ = ["ADAPTER_FILE", "SLOTS_FILE", "export_onnx_adapter", "export_onnx_base", "onnx_adapter_file",
           "read_base_info", "read_onnx_adapter", "write_onnx_adapter"]
