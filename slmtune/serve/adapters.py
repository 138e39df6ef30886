"""Which adapters may be served, and which are loaded on the model right now.

    registry = AdapterRegistry(model, base_model="smollm2-135m-instruct", max_loaded=4)
    registry.register("support", "runs/quickstart")   # a run directory or a plain PEFT adapter directory
    with registry.use("support") as model:            # engine thread only: loads on first use, LRU-evicts
        model.generate(...)

Requests name adapters; only names registered here (at startup or through the admin API) map to
a directory, so no request can make the server open a path of its choosing. All adapters live on
one PeftModel (PEFT's load_adapter / set_adapter / delete_adapter); the base model is served from
the same weights with the adapter layers disabled, so there is only ever one copy of the base.
"""

from __future__ import annotations

import json
import re
import itertools
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from slmtune.config import RecipeError
from slmtune.models import CATALOG, models_dir
from slmtune.training.rundir import RunDir

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # fullmatch: `$` accepts a trailing newline


class AdapterError(ValueError):
    """An adapter that cannot be registered or loaded; the message says why."""


class UnknownModel(LookupError):
    """A request named a model that is neither the base nor a registered adapter."""

    def __init__(self, name: str):
        super().__init__(f"The model `{name}` does not exist or is not served here; GET /v1/models lists them.")
        self.name = name


@dataclass(frozen=True)
class AdapterSource:
    name: str
    path: Path  # the PEFT adapter directory itself (adapter_config.json + weights)
    given: str  # what the user registered: a run directory or the adapter directory


def _model_identity(name: str) -> tuple[str, str] | None:
    """("path", resolved dir) or ("name", catalog/hub name); None when it cannot be told (a relative
    path that does not exist from here), so a comparison is only made when it means something."""
    from slmtune.models import CATALOG, models_dir

    if name in CATALOG:
        return ("path", str((models_dir() / name).resolve()))
    path = Path(name).expanduser()
    if path.exists():
        return ("path", str(path.resolve()))
    if path.is_absolute() or name.startswith("."):
        return None
    return ("name", name)


def check_adapter_name(name: str) -> None:
    """Adapter names are ids in requests, never paths: AdapterError unless 1-64 safe characters."""
    if not NAME_PATTERN.fullmatch(name or ""):
        raise AdapterError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_', ':' or '-', "
                           "starting with a letter or digit")


def resolve_adapter(name: str, path: str | Path, base_model: str | None = None) -> AdapterSource:
    """Check a name and a run directory / PEFT adapter directory; raise AdapterError if unusable."""
    check_adapter_name(name)
    given = Path(path).expanduser()
    root = given.resolve()
    trained_on = None
    if RunDir.holds_run(root):
        run_dir = RunDir(root)
        try:
            trained_on = run_dir.recipe().model.name
        except RecipeError as err:
            raise AdapterError(f"{given}: cannot read the run's recipe.yaml: {err}") from None
        kind = run_dir.artifact_kind()
        if kind == "model":
            raise AdapterError(f"{given} is a full fine-tune: a whole model, not an adapter; serve it with "
                               f"`slmtune serve --model {run_dir.artifact()}`")
        if kind is None:
            raise AdapterError(f"{given}: the run has not finished (no adapter/ yet)")
        adapter_dir = run_dir.artifact()
    elif root.is_dir():
        adapter_dir = root
    else:
        raise AdapterError(f"{given}: no such directory")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{given}: neither a run directory (recipe.yaml + adapter/) nor a PEFT adapter "
                           "directory (adapter_config.json)")
    try:
        config = json.loads(config_file.read_text())
        peft_type, init = config.get("peft_type"), config.get("init_lora_weights", True)
    except (OSError, ValueError, AttributeError) as err:
        raise AdapterError(f"{config_file}: not a readable adapter config: {err}") from None
    if peft_type != "LORA":
        # PEFT keeps adapters of one type per PeftModel, and the base must stay shared.
        raise AdapterError(f"{given}: a {peft_type} adapter; the server serves LoRA adapters (lora, dora, qlora runs)")
    if isinstance(init, str) and init != "gaussian":
        # PiSSA/OLoRA-style initialisations rewrite the base weights when loaded, which would change
        # the base for every other adapter; a run's final adapter/ is already converted to plain LoRA.
        raise AdapterError(f"{given}: initialised with {init!r}, which rewrites the base model's weights on "
                           "loading; serve the run's final adapter/ (converted to plain LoRA) instead")
    if not any(adapter_dir.glob("adapter_model.*")):
        raise AdapterError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors)")
    if trained_on is not None and base_model is not None:
        # LoRA weights of another base of the same shape would load without error and produce
        # nonsense, so refuse when we can tell the run was trained on a different model.
        a, b = _model_identity(trained_on), _model_identity(base_model)
        if a is not None and b is not None and a[0] == b[0] and a != b:
            raise AdapterError(f"{given} was trained on {trained_on!r}, but this server serves {base_model!r}")
    return AdapterSource(name=name, path=adapter_dir, given=str(given))


class AdapterNames:
    """The bookkeeping every adapter registry shares: the allow-list name -> AdapterSource and the
    least-recently-used set loaded on the model (name -> (source, the backend's handle)): `max_loaded`
    at most, one more while a new adapter loads (the least recently used goes once it has loaded).

    register/remove/list are safe from any thread; sync(), _ensure_loaded() and the subclass's use()
    touch the model and must only be called from the thread that owns it (the engine thread). A
    subclass says how a path becomes a source (`_resolve`), how a source is loaded into the backend
    (`_open`, returning the backend's handle, AdapterError on failure) and how a handle goes (`_close`)."""

    def __init__(self, model, *, max_loaded: int = 4):
        if max_loaded < 1:
            raise AdapterError("max_loaded must be at least 1")
        self.model = model
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._sources: dict[str, AdapterSource] = {}
        self._loaded: OrderedDict[str, tuple[AdapterSource, object]] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def _resolve(self, name: str, path: str | Path) -> AdapterSource:
        raise NotImplementedError

    def _open(self, source: AdapterSource) -> object:
        raise NotImplementedError

    def _close(self, name: str, handle: object) -> None:
        raise NotImplementedError

    # --- any thread -------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, *, reserved: set[str] = frozenset()) -> AdapterSource:
        source = self._resolve(name, path)
        if name in reserved:
            raise AdapterError(f"{name!r} is the base model's name; pick another adapter name")
        with self._lock:
            existing = self._sources.get(name)
            if existing is not None and existing.path != source.path:
                raise AdapterError(f"adapter {name!r} is already registered for {existing.given}; remove it first")
            self._sources[name] = source
        return source

    def remove(self, name: str) -> AdapterSource:
        """Forget a name; it is unloaded by the next sync() in the engine thread."""
        with self._lock:
            if name not in self._sources:
                raise UnknownModel(name)
            return self._sources.pop(name)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._sources

    def names(self) -> list[str]:
        with self._lock:
            return list(self._sources)

    def loaded(self) -> list[str]:
        """Loaded adapter names, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def describe(self) -> list[dict]:
        with self._lock:
            return [{"name": s.name, "path": s.given, "adapter_dir": str(s.path), "loaded": s.name in self._loaded}
                    for s in self._sources.values()]

    # --- engine thread only ------------------------------------------------------------------
    def sync(self) -> None:
        """Unload adapters that were removed (or re-registered elsewhere) since they were loaded."""
        with self._lock:
            stale = [n for n, (s, _) in self._loaded.items() if self._sources.get(n) != s]
        for name in stale:
            self._unload(name)

    def _ensure_loaded(self, name: str) -> object:
        """Load adapter `name` if needed (evicting the least recently used past the cap), mark it
        most recently used, and return the backend's handle for it."""
        with self._lock:
            source = self._sources.get(name)
        if source is None:
            raise UnknownModel(name)
        if name in self._loaded and self._loaded[name][0] != source:
            self._unload(name)  # re-registered elsewhere since it was loaded
        if name not in self._loaded:
            # Load before evicting: an adapter that fails to load leaves the loaded ones serving
            # (one more than the cap is loaded for a moment; adapters are small next to the base).
            handle = self._open(source)
            with self._lock:
                self._loaded[name] = (source, handle)
            self.loads += 1
            while len(self._loaded) > self.max_loaded:
                self._unload(next(iter(self._loaded)))  # the least recently used; the new one is last
                self.evictions += 1
        with self._lock:
            self._loaded.move_to_end(name)
            return self._loaded[name][1]

    def _touch(self, names: list[str]) -> None:
        """Mark the loaded ones among `names` most recently used, so loading the others for the same
        batch never evicts them."""
        with self._lock:
            for name in names:
                if name in self._loaded:
                    self._loaded.move_to_end(name)

    def _unload(self, name: str) -> None:
        with self._lock:
            _, handle = self._loaded.pop(name)
        self._close(name, handle)


class AdapterRegistry(AdapterNames):
    """PEFT adapters (run directories or adapter directories) on one PeftModel (AdapterNames has the
    allow-list and the least-recently-used set)."""

    def __init__(self, model, *, base_model: str | None = None, max_loaded: int = 4):
        super().__init__(model, max_loaded=max_loaded)  # the plain base, or the PeftModel once one is loaded
        self.base_model = base_model
        # PEFT gets adapter names of its own: it cannot take "." in a name, and mishandles names
        # that occur in its "lora_" prefix.
        self._peft_names = (f"slot{i}" for i in itertools.count())

    def _resolve(self, name: str, path: str | Path) -> AdapterSource:
        return resolve_adapter(name, path, self.base_model)

    @contextmanager
    def use(self, name: str | None) -> Iterator[object]:
        """The model with adapter `name` active, or the base (adapters disabled) for None."""
        from peft import PeftModel  # ~9 s to import; a server with no adapter loaded never needs it

        if name is None:
            if isinstance(self.model, PeftModel):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        peft_name = self._ensure_loaded(name)
        self.model.set_adapter(peft_name)
        yield self.model

    @contextmanager
    def use_mixed(self, names: list[str | None]) -> Iterator[tuple[object, list[str]] | None]:
        """The model with every adapter in `names` loaded at once, and PEFT's adapter name for each
        row of a mixed batch ("__base__" for None, the base model): the base weights then run once
        for the whole batch and each LoRA only on its own rows. Yields None when the set cannot be
        served that way (more adapters than may be loaded at once, or DoRA, which PEFT cannot mix)."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if not wanted or len(wanted) > self.max_loaded:
            yield None
            return
        self._touch(wanted)
        peft_names = {name: self._ensure_loaded(name) for name in wanted}
        if any(getattr(self.model.peft_config[p], "use_dora", False) for p in peft_names.values()):
            yield None
            return
        yield self.model, ["__base__" if n is None else peft_names[n] for n in names]

    def _open(self, source: AdapterSource) -> str:
        """Load the adapter into the PeftModel (making one on the first); its PEFT adapter name."""
        from peft import PeftModel  # ~9 s to import; a server with no adapter loaded never needs it

        peft_name = next(self._peft_names)
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(source.path), adapter_name=peft_name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(source.path), adapter_name=peft_name,
                                                       is_trainable=False)
        except Exception as err:  # PEFT raises many types for incompatible or corrupt adapters
            if isinstance(self.model, PeftModel) and peft_name in self.model.peft_config:
                self.model.delete_adapter(peft_name)  # a half-loaded adapter must not linger
            raise AdapterError(f"adapter {source.name!r} ({source.given}) could not be loaded: {err}") from err
        self.model.eval()
        return peft_name

    def _close(self, name: str, peft_name: str) -> None:
        if len(self._loaded) == 0:
            # PEFT cannot disable or run a PeftModel that has no adapter left, so go back to the
            # plain base model (unload() removes the LoRA layers and returns the original modules).
            self.model = self.model.unload()
        else:
            with warnings.catch_warnings():
                # PEFT warns when the active adapter goes; we set the adapter before every batch.
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(peft_name)


class NoAdapters:
    """The registry of a backend that serves one exported model (ONNX, llama.cpp): the model itself and
    nothing else; registering an adapter is refused with `why`."""

    max_loaded = 0
    loads = 0
    evictions = 0

    def __init__(self, model, why: str):
        self.model = model
        self.why = why

    def register(self, name, path, *, reserved=frozenset()):
        raise AdapterError(self.why)

    def remove(self, name):
        raise UnknownModel(name)

    def __contains__(self, name) -> bool:
        return False

    def names(self) -> list[str]:
        return []

    def loaded(self) -> list[str]:
        return []

    def describe(self) -> list[dict]:
        return []

    def sync(self) -> None:
        pass

    @contextmanager
    def use(self, name):
        if name is not None:
            raise UnknownModel(name)
        yield self.model
