"""Shared fixtures: tiny seeded model folders, PEFT-made adapters, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", module="transformers")

from edgelora.base import quiet_transformers  # noqa: E402
from edgelora.tiny import make_tiny  # noqa: E402

quiet_transformers()
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_dir("llama") -> a seeded tiny model folder (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}") / "model", seed=0)
        return cache[family]

    return get


AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "FEATURE_EXTRACTION": "AutoModel",
    None: "AutoModel",
}


def load_task_model(folder: Path, task_type: str | None, **kwargs: Any) -> torch.nn.Module:
    import transformers

    return getattr(transformers, AUTO[task_type]).from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def make_peft_adapter(base: Path, out: Path, seed: int = 1, num_labels: int | None = None, **lora_kwargs: Any) -> Path:
    """Save an adapter made by the real peft library, with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    task_type = lora_kwargs.get("task_type")
    kw = {"num_labels": num_labels} if num_labels else {}
    torch.manual_seed(seed)
    model = load_task_model(base, task_type, **kw)
    lora_kwargs.setdefault("init_lora_weights", False)  # random B too, so ΔW ≠ 0
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    with torch.no_grad():  # trained-looking heads, biases and magnitudes, not their init values
        for name, p in peft_model.named_parameters():
            if p.requires_grad and not name.endswith(("lora_A.default.weight", "lora_B.default.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(str(out))
    return out


def make_labelled_adapters(base: Path, root: Path, labels: dict[str, list[str]]) -> dict[str, Path]:
    """One tiny classification adapter per task (r=4 on query, value; seeds 1, 2, ...) with its label names in
    edgelora.json, as `edgelora train` records them."""
    adapters = {}
    for seed, (task, names) in enumerate(labels.items(), start=1):
        path = make_peft_adapter(base, root / task, seed=seed, num_labels=len(names), task_type="SEQ_CLS",
                                 target_modules=["query", "value"], r=4, lora_alpha=8)
        record = {"format": 1, "labels": names, "task": "sequence-classification"}
        (path / "edgelora.json").write_text(json.dumps(record))
        adapters[task] = path
    return adapters


def peft_reference(base: Path, adapter: Path, task_type: str | None, num_labels: int | None = None
                   ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(peft unmerged model, peft merge_and_unload model) for the adapter on a fresh base."""
    from peft import PeftModel

    kw = {"num_labels": num_labels} if num_labels else {}
    unmerged = PeftModel.from_pretrained(load_task_model(base, task_type, **kw), str(adapter)).eval()
    merged = PeftModel.from_pretrained(load_task_model(base, task_type, **kw), str(adapter)).merge_and_unload()
    return unmerged, merged.eval()


def model_output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Run ``edgelora ARGS`` in-process through the real entry point (exit codes, stderr)."""
    from click.testing import CliRunner

    from edgelora.cli import main

    def run(*args: Any) -> CliResult:
        runner = CliRunner()
        with runner.isolation() as streams:
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
        return CliResult(code, out, err)

    return run


def tree(path: Path) -> list[str]:
    """Every entry under ``path`` (to prove nothing partial was left behind)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# Tiny deployments shared by test_export and test_runtime: two peft adapters per family, exported to cpu-fp32.
FAMILIES = {
    "bert": ("SEQ_CLS", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8}, 3),
    "gpt2": ("CAUSAL_LM", {"target_modules": ["c_attn", "c_proj"], "r": 4, "lora_alpha": 16, "fan_in_fan_out": True},
             None),
    "llama": ("CAUSAL_LM", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4, "lora_alpha": 8,
                            "use_rslora": True}, None),
    "qwen2": ("CAUSAL_LM", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8,
                            "rank_pattern": {"down_proj": 2}}, None),
}


@pytest.fixture(scope="session")
def family_adapters(tiny_dir, tmp_path_factory):
    """family -> (base, {task: adapter folder}) made by the real peft library."""
    out = {}
    for family, (task_type, kw, labels) in FAMILIES.items():
        root = tmp_path_factory.mktemp(f"ad_{family}")
        out[family] = (tiny_dir(family), {
            f"t{s}": make_peft_adapter(tiny_dir(family), root / f"t{s}", seed=s, num_labels=labels,
                                       task_type=task_type, **kw) for s in (1, 2)})
    return out


@pytest.fixture(scope="session")
def exported(family_adapters, tmp_path_factory):
    """family -> fp32 deployment folder (both tasks), written through the CLI entry point."""
    return {family: export_folder(base, adapters, tmp_path_factory.mktemp(f"dep_{family}") / "out",
                                  "--target", "cpu-fp32")
            for family, (base, adapters) in family_adapters.items()}


def export_folder(base: Path, adapters: dict[str, Path], out: Path, *extra: str) -> Path:
    """``edgelora export`` of ``adapters`` (name -> folder) on ``base`` into ``out`` through the CLI entry point,
    with ``extra`` arguments; fails the caller when the export does not exit 0."""
    from edgelora.cli import main

    args = ["export", "--base", str(base), "-o", str(out), "-q", *extra]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), f"the export to {out} failed"
    return out


def schema_validator():
    """A JSON Schema validator of manifest.json (the published schema, edgelora/format/manifest.schema.json)."""
    import json

    import jsonschema

    schema = json.loads((REPO / "edgelora/format/manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def assert_one_line_error(res: Any, *needles: str) -> None:
    """A CLI result that is a bad-input refusal: exit 2 and one ``error: ...`` line naming each of ``needles``."""
    lines = res.err.strip().splitlines()
    assert res.code == 2, res
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    for n in needles:
        assert n in lines[0], (n, lines[0])
