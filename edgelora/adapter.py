"""The LoRA adapter: its config, its tensors, and lossless PEFT folder I/O.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. edgelora
reads every field that changes the math (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
``alpha_pattern``, ``target_modules``, ``fan_in_fan_out``, ``modules_to_save``, ``use_dora``,
``lora_bias``, ``bias``), refuses the PEFT features it cannot deploy, and keeps the whole JSON and
every tensor exactly as read, so ``load -> save -> load`` is bit-identical.

Adapters trained by edgelora also carry ``edgelora.json`` (base fingerprint, labels, metrics, the
command that made them); PEFT ignores that file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import names
from .errors import EdgeloraError
from .fsutil import atomic_output_dir
from .hashing import hash_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
RECORD_NAME = "edgelora.json"

# PEFT features that change the forward pass in ways a merged engine cannot reproduce.
# (field, predicate on its value -> True when the feature is in use, why it is refused)
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("layer_replication", lambda v: bool(v), "it duplicates base layers"),
    ("target_parameters", lambda v: bool(v), "it wraps raw parameters, not modules"),
    ("trainable_token_indices", lambda v: bool(v), "it trains individual embedding rows"),
    ("use_qalora", lambda v: bool(v), "it is tied to a quantized base"),
    ("alora_invocation_tokens", lambda v: bool(v), "activated LoRA depends on the input and cannot be merged"),
    ("use_bdlora", lambda v: bool(v), "block-diagonal LoRA is not supported"),
    ("arrow_config", lambda v: bool(v), "Arrow routing depends on the input and cannot be merged"),
    ("velora_config", lambda v: bool(v), "VeLoRA is not supported"),
    ("kasa_config", lambda v: bool(v), "KaSA is not supported"),
    ("monteclora_config", lambda v: bool(v), "MonteCLoRA is not supported"),
    (
        "init_lora_weights",
        lambda v: isinstance(v, str) and v.split("_")[0].lower() in {"pissa", "olora", "corda", "loftq"},
        "this initialisation rewrites the base weights; save the adapter with PEFT's "
        "path_initial_model_for_weight_conversion to get a plain LoRA",
    ),
)


def _check_patterns(raw: Mapping[str, Any], source: str) -> None:
    """Fields PEFT uses as regular expressions (as names.py applies them) must compile: a one-line error naming
    the field, not Python's ``re.error`` when the first module is matched."""
    import re

    patterns: list[tuple[str, str]] = []
    for key in ("rank_pattern", "alpha_pattern"):
        patterns += [(key, rf"(.*\.)?({k})$") for k in (raw.get(key) or {})]
    for key in ("target_modules", "exclude_modules"):
        if isinstance(raw.get(key), str):
            patterns.append((key, raw[key]))
    templates = {"layers_pattern": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", "modules_to_save": r"(^|.*\.){}($|\..*)"}
    for key, template in templates.items():
        value = raw.get(key)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        patterns += [(key, template.format(item)) for item in items if isinstance(item, str)]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise EdgeloraError(f"{source}: '{key}' holds a pattern that is not a valid regular expression ({exc}); "
                                "fix it") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that edgelora uses; ``raw`` keeps the whole file."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] | None = None
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    # complexity: one flat check per PEFT field, each with its own message naming the field; splitting them
    # would scatter the one list a reader checks against PEFT's LoraConfig
    def from_dict(cls, raw: Mapping[str, Any], source: str = CONFIG_NAME) -> AdapterConfig:  # noqa: C901
        """Validate a parsed ``adapter_config.json``; every error names the field and the fix."""
        if not isinstance(raw, Mapping):
            raise EdgeloraError(f"{source} must hold a JSON object; re-save the adapter with PEFT")
        peft_type = raw.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise EdgeloraError(f"{source}: peft_type is {peft_type!r}; edgelora deploys LoRA adapters only")
        if "r" not in raw:
            raise EdgeloraError(f"{source} has no 'r' (the LoRA rank); add \"r\": <rank ≥ 1>")
        r = raw["r"]
        if not _is_int(r) or r < 1:
            raise EdgeloraError(f"{source}: 'r' is {r!r}; the LoRA rank must be an integer ≥ 1")
        alpha = raw.get("lora_alpha", 8)
        if not _is_number(alpha):
            raise EdgeloraError(f"{source}: 'lora_alpha' is {alpha!r}; it must be a finite number")

        rank_pattern = raw.get("rank_pattern") or {}
        if not isinstance(rank_pattern, Mapping) or not all(
            _is_int(v) and v >= 1 for v in rank_pattern.values()
        ):
            raise EdgeloraError(f"{source}: 'rank_pattern' must map module patterns to integer ranks ≥ 1")
        alpha_pattern = raw.get("alpha_pattern") or {}
        if not isinstance(alpha_pattern, Mapping) or not all(_is_number(v) for v in alpha_pattern.values()):
            raise EdgeloraError(f"{source}: 'alpha_pattern' must map module patterns to finite numbers")

        for key, in_use, why in _UNSUPPORTED:
            if key in raw and in_use(raw[key]):
                raise EdgeloraError(f"{source}: '{key}' is set ({raw[key]!r}); {why}. Remove it or retrain")

        bias = raw.get("bias", "none") or "none"
        if bias not in ("none", "all", "lora_only"):
            raise EdgeloraError(f"{source}: 'bias' is {bias!r}; expected 'none', 'all' or 'lora_only'")
        for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            if flag in raw and raw[flag] is not None and not isinstance(raw[flag], bool):
                raise EdgeloraError(f"{source}: '{flag}' is {raw[flag]!r}; it must be true or false")

        def _seq(key: str) -> tuple[str, ...] | str | None:
            v = raw.get(key)
            if v is None or isinstance(v, str):
                return v
            if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                return tuple(dict.fromkeys(v))  # PEFT stores sets as lists; keep first-seen order
            raise EdgeloraError(f"{source}: '{key}' must be a string (regex) or a list of module names")

        ltt = raw.get("layers_to_transform")
        if ltt is not None and not (_is_int(ltt) or (isinstance(ltt, list) and all(map(_is_int, ltt)))):
            raise EdgeloraError(f"{source}: 'layers_to_transform' must be an integer or a list of integers")
        mts = _seq("modules_to_save")
        _check_patterns(raw, source)
        return cls(
            r=r,
            lora_alpha=float(alpha),
            use_rslora=bool(raw.get("use_rslora") or False),
            rank_pattern=dict(rank_pattern),
            alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
            target_modules=_seq("target_modules"),
            exclude_modules=_seq("exclude_modules"),
            layers_to_transform=tuple(ltt) if isinstance(ltt, list) else ltt,
            layers_pattern=_seq("layers_pattern"),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out") or False),
            modules_to_save=(mts,) if isinstance(mts, str) else mts,
            use_dora=bool(raw.get("use_dora") or False),
            lora_bias=bool(raw.get("lora_bias") or False),
            bias=bias,
            task_type=raw.get("task_type"),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            raw=dict(raw),
        )

    # -- per-module hyper-parameters, PEFT's rules ---------------------------------------------
    def rank_for(self, module: str) -> int:
        return int(names.pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(names.pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for this module."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether this config puts LoRA on ``module`` (PEFT's matching rules)."""
        return names.matches_target(
            module,
            self.target_modules,
            exclude_modules=self.exclude_modules,
            modules_to_save=self.modules_to_save,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
        )


@dataclass(frozen=True)
class LoraModule:
    """The LoRA weights of one module. Shapes as PEFT stores them.

    linear:    A (r, in),             B (out, r)
    embedding: A (r, num_embeddings), B (dim, r)
    """

    name: str
    kind: str  # "linear" | "embedding"
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: (out,)
    bias: torch.Tensor | None = None  # lora_bias=True: (out,)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class AdapterRecord:
    """``edgelora.json``: what edgelora knows about an adapter it trained."""

    base_fingerprint: str | None = None
    base: str | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    command: str | None = None
    train_args: Mapping[str, Any] = field(default_factory=dict)
    format: int = 1
    # what the classifier reads: "cls" (transformers' head) or "mean" (edgelora.modeling_edgelora);
    # None: a record written before pooling was recorded, which means "cls"
    pooling: str | None = None

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> AdapterRecord:
        if not isinstance(raw, Mapping):
            raise EdgeloraError(f"{source} must hold a JSON object; delete it or re-train the adapter")
        labels = raw.get("labels")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise EdgeloraError(f"{source}: 'labels' must be a list of strings")
        fp = raw.get("base_fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise EdgeloraError(f"{source}: 'base_fingerprint' must be a sha256 hex string")
        pooling = raw.get("pooling")
        if pooling is not None and pooling not in ("cls", "mean"):
            raise EdgeloraError(f"{source}: 'pooling' is {pooling!r:.30}; it must be \"cls\" or \"mean\" "
                                "(what the classifier reads)")
        return cls(
            base_fingerprint=fp,
            base=raw.get("base"),
            task=raw.get("task"),
            labels=tuple(labels) if labels is not None else None,
            metrics=dict(raw.get("metrics") or {}),
            command=raw.get("command"),
            train_args=dict(raw.get("train_args") or {}),
            format=int(raw.get("format", 1)),
            pooling=pooling,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "base_fingerprint": self.base_fingerprint,
            "base": self.base,
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "metrics": dict(self.metrics),
            "command": self.command,
            "train_args": dict(self.train_args),
            **({"pooling": self.pooling} if self.pooling is not None else {}),
        }


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as read from disk: config, parsed modules, and the original tensors."""

    config: AdapterConfig
    modules: Mapping[str, LoraModule]
    replacements: Mapping[str, torch.Tensor]  # task-model parameter name -> tensor (modules_to_save, bias)
    tensors: Mapping[str, torch.Tensor]  # every tensor under its original key (lossless save)
    metadata: Mapping[str, str] | None = None  # safetensors header metadata
    record: AdapterRecord | None = None
    source: Path | None = None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def content_hash(self) -> str:
        """sha256 over every tensor and the config (stable across runs and file layouts)."""
        cfg = json.dumps(self.config.raw, sort_keys=True, separators=(",", ":"), default=str).encode()
        return hash_tensors(self.tensors, extra=cfg)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgeloraError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix or re-save it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeloraError(f"cannot read {path} ({exc}); check the file") from None


def _read_tensors(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, Path]:
    st_path = folder / WEIGHTS_NAME
    bin_path = folder / PICKLE_NAME
    if st_path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(st_path), framework="pt") as f:
                metadata = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EdgeloraError(
                f"{st_path} is truncated or corrupt ({reason}); re-download or re-save the adapter"
            ) from None
        return tensors, metadata, st_path
    if bin_path.is_file():
        if not allow_pickle:
            raise EdgeloraError(
                f"{bin_path} is a pickle, which can run code when loaded; convert it to "
                f"{WEIGHTS_NAME}, or pass --allow-pickle if you trust it"
            )
        try:
            obj = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EdgeloraError(f"{bin_path} cannot be loaded safely ({reason}); re-save it as safetensors") from None
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise EdgeloraError(f"{bin_path} is not a flat dict of tensors; re-save it as safetensors")
        return {str(k): v for k, v in obj.items()}, None, bin_path
    raise EdgeloraError(f"{folder} has no {WEIGHTS_NAME}; point --adapter at a PEFT adapter folder")


def load_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read and check a PEFT adapter folder (config, tensors, finite float values, A/B pairing)."""
    folder = Path(path)
    if not folder.exists():
        raise EdgeloraError(f"adapter folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise EdgeloraError(f"{folder} is a file; pass the adapter folder that holds {CONFIG_NAME}")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise EdgeloraError(f"{folder} has no {CONFIG_NAME}; point at a PEFT adapter folder")
    config = AdapterConfig.from_dict(_read_json(cfg_path), str(cfg_path))
    tensors, metadata, weights_path = _read_tensors(folder, allow_pickle)
    record = None
    if (folder / RECORD_NAME).is_file():
        record = AdapterRecord.from_dict(_read_json(folder / RECORD_NAME), str(folder / RECORD_NAME))
    return build_adapter(config, tensors, metadata=metadata, record=record, source=folder, where=weights_path)


# complexity: one check per way a module's tensors can be malformed (pairing, shapes, rank, DoRA, bias),
# each with its own message; they read in the order PEFT builds a LoRA layer
def build_adapter(  # noqa: C901
    config: AdapterConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    record: AdapterRecord | None = None,
    source: Path | None = None,
    where: Path | str = WEIGHTS_NAME,
) -> Adapter:
    """Parse tensors into modules and replacements, checking dtypes, finiteness and shapes."""
    for key, t in tensors.items():
        if not torch.is_floating_point(t):
            raise EdgeloraError(
                f"{where}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                "LoRA weights must be float (fp32, fp16 or bf16)"
            )
        if not bool(torch.isfinite(t).all()):
            raise EdgeloraError(f"{where}: tensor {key!r} contains NaN or Inf; the adapter is broken, retrain it")

    parts: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        parsed = names.parse_lora_key(key)
        if parsed is None:
            replacements[names.replacement_param_name(key)] = t
        else:
            parts.setdefault(parsed.module, {})[(parsed.part, parsed.param)] = t

    modules: dict[str, LoraModule] = {}
    for module, got in sorted(parts.items()):
        if ("lora_A", "weight") in got or ("lora_B", "weight") in got:
            kind, a_key, b_key = "linear", ("lora_A", "weight"), ("lora_B", "weight")
        else:
            kind, a_key, b_key = "embedding", ("lora_embedding_A", "weight"), ("lora_embedding_B", "weight")
        if a_key not in got or b_key not in got:
            have = "A" if a_key in got else "B"
            need = "B" if have == "A" else "A"
            raise EdgeloraError(
                f"{where}: module {module!r} has LoRA {have} but no {need}; the file is incomplete, re-save it"
            )
        A, B = got[a_key], got[b_key]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise EdgeloraError(
                f"{where}: module {module!r} has A {tuple(A.shape)} and B {tuple(B.shape)}; "
                "expected A (r, in) and B (out, r) with the same r"
            )
        if A.shape[0] == 0:
            raise EdgeloraError(f"{where}: module {module!r} has rank 0; LoRA needs rank ≥ 1, retrain it")
        expected_r = config.rank_for(module)
        if A.shape[0] != expected_r:
            raise EdgeloraError(
                f"{where}: module {module!r} has rank {A.shape[0]} but {CONFIG_NAME} gives r={expected_r}; "
                "fix 'r' or 'rank_pattern' so the scale alpha/r is right"
            )
        magnitude = got.get(("lora_magnitude_vector", "weight"))
        if config.use_dora and magnitude is None:
            raise EdgeloraError(f"{where}: use_dora is true but module {module!r} has no lora_magnitude_vector")
        if magnitude is not None and not config.use_dora:
            raise EdgeloraError(
                f"{where}: module {module!r} has a DoRA magnitude but {CONFIG_NAME} has use_dora=false; fix the config"
            )
        if magnitude is not None and tuple(magnitude.shape) != (B.shape[0],):
            raise EdgeloraError(
                f"{where}: module {module!r} DoRA magnitude has shape {tuple(magnitude.shape)}, "
                f"expected ({B.shape[0]},)"
            )
        bias = got.get(("lora_B", "bias"))
        if bias is not None and not config.lora_bias:
            raise EdgeloraError(
                f"{where}: module {module!r} has lora_B.bias but {CONFIG_NAME} has lora_bias=false; fix the config"
            )
        unknown = set(got) - {a_key, b_key, ("lora_magnitude_vector", "weight"), ("lora_B", "bias")}
        if unknown:
            part, param = sorted(unknown)[0]
            raise EdgeloraError(f"{where}: module {module!r} has an unexpected LoRA tensor {part}.{param}")
        modules[module] = LoraModule(
            name=module,
            kind=kind,
            A=A,
            B=B,
            scale=config.scale_for(module),
            magnitude=magnitude,
            bias=bias,
        )
    if not modules:
        raise EdgeloraError(f"{where} holds no LoRA tensors (lora_A / lora_B); is this a PEFT LoRA adapter?")
    return Adapter(
        config=config,
        modules=modules,
        replacements=replacements,
        tensors=dict(tensors),
        metadata=dict(metadata) if metadata is not None else None,
        record=record,
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_adapter_files(adapter: Adapter, folder: Path) -> None:
    """Write the PEFT files into an existing folder (no atomicity: see :func:`save_adapter`)."""
    from safetensors.torch import save_file

    (folder / CONFIG_NAME).write_text(json.dumps(adapter.config.raw, indent=2) + "\n", encoding="utf-8")
    metadata = dict(adapter.metadata) if adapter.metadata is not None else {"format": "pt"}
    save_file({k: v.contiguous() for k, v in adapter.tensors.items()}, str(folder / WEIGHTS_NAME), metadata)
    if adapter.record is not None:
        write_record(adapter.record, folder)


def write_record(record: AdapterRecord, folder: Path) -> None:
    (folder / RECORD_NAME).write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")


def save_adapter(adapter: Adapter, path: str | Path, *, force: bool = False) -> Path:
    """Write ``adapter`` as a PEFT folder, atomically. Tensors and config are written as read."""
    with atomic_output_dir(path, force=force) as tmp:
        write_adapter_files(adapter, tmp)
    return Path(path)
