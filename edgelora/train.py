"""``edgelora train``: LoRA fine-tuning with the paper's recipe (Hu et al. 2021, §4).

A is random (Kaiming-uniform, PEFT's default), B is zero, so training starts exactly at the base
model; only ``W_q`` and ``W_v`` are adapted unless told otherwise (§7.1); ``ΔW`` is scaled by
``alpha / r``. PEFT does the injection. For sequence classification the task head is trained and
saved as ``modules_to_save``. The output is a PEFT folder plus ``edgelora.json`` with the base
fingerprint, the labels, the per-epoch validation metrics and the command that made it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .adapter import AdapterRecord, write_record
from .base import (
    DEFAULT_BASE_NAME,
    POOLINGS,
    TASKS,
    HeadSpec,
    bundled_base_path,
    default_pooling,
    fingerprint,
    load_model,
    read_config,
    resolve_base,
)
from .errors import EdgeloraError
from .fsutil import atomic_output_dir, check_output

TRAIN_TASKS = ("sequence-classification", "causal-lm")


@dataclass(frozen=True)
class TrainConfig:
    """LoRA hyper-parameters. Every field is a ``edgelora train`` option of the same name."""

    r: int = 8  # rank of ΔW
    alpha: float = 16.0  # ΔW is scaled by alpha / r (alpha / sqrt(r) with rslora)
    targets: tuple[str, ...] | None = None  # module names; None = W_q, W_v of the model family
    dropout: float = 0.0  # dropout on the LoRA branch input
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    lr: float = 2e-3  # best of 1e-3, 2e-3, 3e-3, 5e-3 for r=8 q,v on MiniLM/SST-2 (benchmarks/README.md)
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (over all epochs)
    warmup_ratio: float = 0.06  # linear warm-up, then linear decay to zero
    weight_decay: float = 0.0
    max_length: int = 128  # tokens per example (longer ones are truncated)
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    # Dropout on the base's attention probabilities. 0 (default) lets PyTorch run its fused
    # attention kernel in training: ~2x faster attention, ~1/3 less activation memory (measured on
    # MiniLM, SST-2 batches). None keeps the model's own value (0.1 for BERT and GPT-2).
    attention_dropout: float | None = 0.0
    # Give freed activation buffers back to the OS (see return_freed_memory_to_os): about half the
    # training memory on MiniLM/SST-2 for ~20% longer steps. False keeps glibc's default allocator.
    lean_allocator: bool = True
    # LoRA+ (Hayou et al. 2024): B matrices learn ratio x faster than A. None = plain LoRA.
    loraplus_ratio: float | None = None
    # Classification: what the classifier reads, "cls" ([CLS] through the pooler) or "mean" (the masked mean of
    # the token states). None = the base's own (edgelora.base.default_pooling: mean for sentence-transformers).
    pooling: str | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.r >= 1, f"--r is {self.r}; the LoRA rank must be ≥ 1"),
            (math.isfinite(self.alpha) and self.alpha > 0, f"--alpha is {self.alpha}; it must be > 0"),
            (0.0 <= self.dropout < 1.0, f"--dropout is {self.dropout}; it must be in [0, 1)"),
            (self.lr > 0, f"--lr is {self.lr}; it must be > 0"),
            (self.batch_size >= 1, f"--batch-size is {self.batch_size}; it must be ≥ 1"),
            (self.epochs >= 1, f"--epochs is {self.epochs}; it must be ≥ 1"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps is {self.max_steps}; it must be ≥ 1"),
            (0.0 <= self.warmup_ratio < 1.0, f"--warmup-ratio is {self.warmup_ratio}; it must be in [0, 1)"),
            (self.weight_decay >= 0, f"--weight-decay is {self.weight_decay}; it must be ≥ 0"),
            (self.max_length >= 2, f"--max-length is {self.max_length}; it must be ≥ 2"),
            (self.threads is None or self.threads >= 1, f"--threads is {self.threads}; it must be ≥ 1"),
            (self.targets is None or len(self.targets) > 0, "--targets is empty; name at least one module"),
            (self.loraplus_ratio is None or self.loraplus_ratio >= 1.0,
             f"--loraplus-ratio is {self.loraplus_ratio}; it must be ≥ 1"),
            (self.attention_dropout is None or 0.0 <= self.attention_dropout < 1.0,
             f"--attention-dropout is {self.attention_dropout}; it must be in [0, 1)"),
            (self.pooling is None or self.pooling in POOLINGS,
             f"--pooling is {self.pooling!r}; use one of {', '.join(POOLINGS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgeloraError(message)


@dataclass
class TrainResult:
    output: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per epoch
    trainable_parameters: int = 0
    total_parameters: int = 0
    seconds: float = 0.0
    model: Any = field(default=None, repr=False)  # the trained PEFT model (in memory, unmerged)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

Item = tuple[list[int], Any]  # (token ids, label: class id, or per-token labels for LM)


def return_freed_memory_to_os(threshold_bytes: int = 256 * 1024) -> bool:
    """Make glibc give freed tensor buffers back to the OS at once (process-wide; Linux/glibc only).

    Length-bucketed batches change activation shapes every step. glibc's default raises its mmap
    threshold to the largest freed buffer (up to 32 MB), so activations then come from the heap,
    which fragments and is never returned: measured on MiniLM/SST-2, a LoRA run's RSS grew to
    about twice its live tensors. A fixed threshold keeps every buffer ≥ 256 KB in its own mapping.
    Returns whether the setting took effect.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the default allocator
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def tokenize_classification(tokenizer: Any, examples: Sequence[data_mod.Example], label_ids: dict[str, int],
                            max_length: int, source: str) -> list[Item]:
    unknown = sorted({e.label for e in examples} - set(label_ids))
    if unknown:
        raise EdgeloraError(
            f"{source} has labels {unknown[:5]} not seen in the training file (labels: {sorted(label_ids)}); "
            "fix the file or pass --labels"
        )
    enc = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
    return [(ids, label_ids[e.label]) for ids, e in zip(enc["input_ids"], examples, strict=True)]


def collate_classification(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    labels = torch.tensor([label for _, label in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def tokenize_lm(tokenizer: Any, examples: Sequence[data_mod.LMExample], max_length: int) -> list[Item]:
    """Prompt tokens get label -100 (no loss); completions end with EOS. Plain text is cut into blocks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise EdgeloraError("the base tokenizer has no EOS token; causal-LM training needs one")
    items: list[Item] = []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [eos]
        if not p and len(c) > max_length:  # plain text: blocks of max_length tokens
            for start in range(0, len(c) - 1, max_length):
                block = c[start : start + max_length]
                if len(block) >= 2:
                    items.append((block, list(block)))
            continue
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        if any(t != -100 for t in labels[1:]):
            items.append((ids, labels))
    if not items:
        raise EdgeloraError("no training example has a completion token within --max-length; raise --max-length")
    return items


def collate_lm(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate_classification(model: Any, items: Sequence[Item], pad_id: int, batch_size: int = 128
                            ) -> dict[str, float]:
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths: less padding
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = collate_classification([items[i] for i in order[start : start + batch_size]], pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return {"accuracy": correct / len(items), "loss": loss_sum / len(items)}


@torch.inference_mode()
def evaluate_lm(model: Any, items: Sequence[Item], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    was_training = model.training
    model.eval()
    nll, tokens, correct = 0.0, 0, 0
    for start in range(0, len(items), batch_size):
        batch = collate_lm(items[start : start + batch_size], pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
        tokens += int(keep.sum())
    model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1)}


# ---------------------------------------------------------------------------------------------
# The loop (shared by LoRA training and the full fine-tuning baseline of benchmarks/)
# ---------------------------------------------------------------------------------------------


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator,
                            pool: int = 64) -> list[list[int]]:
    """Random batches of similar-length examples (less padding: ~3x fewer tokens on SST-2).

    Shuffle, cut into pools of ``pool`` batches, sort each pool by length, split it into batches,
    shuffle the batches. Every example is used once per epoch; the batch count is unchanged.
    """
    order = torch.randperm(len(lengths), generator=gen).tolist()
    batches: list[list[int]] = []
    span = batch_size * pool
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def make_optimizer(model: Any, params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``params``; with ``cfg.loraplus_ratio``, PEFT's LoRA+ parameter groups."""
    if cfg.loraplus_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_ratio,
                                         loraplus_weight_decay=cfg.weight_decay, foreach=True)
    # foreach=True: one fused kernel launch per group rather than a Python loop over parameters.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def train_loop(
    model: Any,
    params: Sequence[torch.nn.Parameter],
    items: Sequence[Item],
    collate: Callable[[Sequence[Item]], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    evaluate: Callable[[], dict[str, float]] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[dict[str, Any]]:
    """AdamW with linear warm-up and decay; evaluates after every epoch. Returns per-epoch metrics."""
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = int(total * cfg.warmup_ratio)
    opt = optimizer if optimizer is not None else make_optimizer(model, params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = [len(ids) for ids, _ in items]
    history: list[dict[str, Any]] = []
    step = 0
    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    ema = None
    for epoch in range(1, cfg.epochs + 1):
        loss_sum, n = 0.0, 0
        for batch_idx in length_bucketed_batches(lengths, cfg.batch_size, gen):
            if step >= total:
                break
            batch = collate([items[i] for i in batch_idx])
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            loss_sum, n, step = loss_sum + value, n + 1, step + 1
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            bar.set_postfix(epoch=epoch, loss=f"{ema:.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(step, value)
        entry: dict[str, Any] = {"epoch": epoch, "steps": step, "train_loss": loss_sum / max(n, 1)}
        if evaluate is not None:
            metrics = evaluate()
            entry.update({f"eval_{k}": v for k, v in metrics.items()})
            bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items()
                                                             if isinstance(v, float)))
        history.append(entry)
        if step >= total:
            break
    bar.close()
    return history


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


# The config field that holds attention-probability dropout, per model family (BERT-likes, GPT-2,
# LLaMA/Qwen2-likes). transformers has no common name for it.
ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")


def load_for_training(base_path: Path, task: str, head: HeadSpec, cfg: TrainConfig) -> Any:
    """The base model, fp32, with the training-time config overrides of ``cfg`` applied."""
    overrides: dict[str, Any] = {}
    if cfg.attention_dropout is not None:
        base_config = read_config(base_path)
        overrides = {f: cfg.attention_dropout for f in ATTENTION_DROPOUT_FIELDS if f in base_config}
    return load_model(base_path, task, head, overrides)


def lora_config(cfg: TrainConfig, task: str, model: Any) -> Any:
    """PEFT ``LoraConfig`` for the paper's recipe; targets default to PEFT's W_q, W_v table.

    Every target must name a module of ``model``; ``fan_in_fan_out`` is set when the targets are
    GPT-2 style ``Conv1D`` layers (weights stored (in, out)), instead of PEFT flipping it silently.
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    from transformers.pytorch_utils import Conv1D

    from .names import matches_target, short_name

    model_type = model.config.model_type
    targets = list(cfg.targets) if cfg.targets else DEFAULT_TARGETS.get(model_type)
    if not targets:
        raise EdgeloraError(f"no default LoRA targets for model type {model_type!r}; pass --targets q_proj,v_proj")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    for target in targets:
        if not any(matches_target(name, [target]) for name in layers):
            known = sorted({short_name(n) for n in layers})
            raise EdgeloraError(
                f"--targets {target!r} names no Linear layer of this {model_type} model "
                f"(its layers: {', '.join(known)}); pick from those"
            )
    fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in layers.items() if matches_target(n, targets))
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        target_modules=list(targets),
        lora_dropout=cfg.dropout,
        use_rslora=cfg.rslora,
        fan_in_fan_out=fan_in_fan_out,
        task_type=TASKS[task][0],
        init_lora_weights=True,  # A ~ Kaiming-uniform, B = 0  ->  ΔW = 0 at step 0
    )


# complexity: the CLI's training options, each a branch of the orchestration (task, data, eval split, labels)
def train(  # noqa: C901
    task: str,
    train_file: str | Path,
    output: str | Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    base: str | Path | None = None,
    eval_file: str | Path | None = None,
    val_fraction: float | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    force: bool = False,
    command: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA adapter and write it (PEFT folder + edgelora.json) to ``output`` atomically."""
    from peft import get_peft_model
    from transformers import AutoTokenizer

    if task not in TRAIN_TASKS:
        raise EdgeloraError(f"--task {task!r} is not trainable; use one of {', '.join(TRAIN_TASKS)}")
    if eval_file is not None and val_fraction is not None:
        raise EdgeloraError("pass either --eval FILE or --val-fraction, not both")
    base_path = resolve_base(base)
    check_output(output, force=force, inputs=[("training data", train_file), ("eval data", eval_file),
                                              ("base", base_path)])  # before minutes of training, not after
    if cfg.pooling is not None and task != "sequence-classification":
        raise EdgeloraError(f"--pooling is for sequence classification; --task {task} has no classifier to feed")
    base_name = DEFAULT_BASE_NAME if base_path == bundled_base_path() else str(base)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.lean_allocator:
        return_freed_memory_to_os()
    seed_everything(cfg.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    except (OSError, ValueError) as exc:
        raise EdgeloraError(f"base {base_path} has no usable tokenizer ({exc}); add tokenizer files") from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise EdgeloraError(f"the tokenizer of {base_path} has neither a pad nor an EOS token")

    # -- data -------------------------------------------------------------------------------
    head = HeadSpec()
    if task == "sequence-classification":
        train_ex = data_mod.read_classification(train_file, text_column, label_column)
        eval_ex = data_mod.read_classification(eval_file, text_column, label_column) if eval_file else None
        if val_fraction is not None:
            train_ex, eval_ex = data_mod.split(train_ex, val_fraction, cfg.seed)
        names = list(labels) if labels else sorted({e.label for e in train_ex})
        if len(names) < 2:
            raise EdgeloraError(f"{train_file} has only the label {names}; classification needs ≥ 2 labels")
        label_ids = {name: i for i, name in enumerate(names)}
        items = tokenize_classification(tokenizer, train_ex, label_ids, cfg.max_length, str(train_file))
        eval_source = str(eval_file or train_file)
        eval_items = (tokenize_classification(tokenizer, eval_ex, label_ids, cfg.max_length, eval_source)
                      if eval_ex else None)
        if label_names is not None:
            if len(label_names) != len(names):
                raise EdgeloraError(
                    f"--label-names has {len(label_names)} names but there are {len(names)} labels "
                    f"({', '.join(names)}); give one name per label, in that order"
                )
            names = list(label_names)  # display names, in label-id order; the files keep their values
        head = HeadSpec(len(names), tuple(names), cfg.pooling or default_pooling(base_path))

        def collate(b: Sequence[Item]) -> dict[str, torch.Tensor]:
            return collate_classification(b, pad_id)
    else:
        lm_train = data_mod.read_lm(train_file)
        lm_eval = data_mod.read_lm(eval_file) if eval_file else None
        if val_fraction is not None:
            lm_train, lm_eval = data_mod.split(lm_train, val_fraction, cfg.seed)
        items = tokenize_lm(tokenizer, lm_train, cfg.max_length)
        eval_items = tokenize_lm(tokenizer, lm_eval, cfg.max_length) if lm_eval else None
        names = None

        def collate(b: Sequence[Item]) -> dict[str, torch.Tensor]:
            return collate_lm(b, pad_id)

    # -- model ------------------------------------------------------------------------------
    model = load_for_training(base_path, task, head, cfg)
    if task == "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    total_params = sum(p.numel() for p in model.parameters())
    seed_everything(cfg.seed)  # LoRA A init depends only on the seed
    peft_model = get_peft_model(model, lora_config(cfg, task, model))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)

    evaluate = None
    if eval_items:
        if task == "sequence-classification":
            evaluate = lambda: evaluate_classification(peft_model, eval_items, pad_id)  # noqa: E731
        else:
            evaluate = lambda: evaluate_lm(peft_model, eval_items, pad_id)  # noqa: E731

    t0 = time.perf_counter()
    history = train_loop(peft_model, params, items, collate, cfg, evaluate, progress,
                         optimizer=make_optimizer(peft_model, params, cfg))
    seconds = time.perf_counter() - t0

    record = AdapterRecord(
        base_fingerprint=fingerprint(base_path),
        base=base_name,
        task=task,
        labels=tuple(names) if names else None,
        metrics={"history": history, "train_examples": len(items),
                 "eval_examples": len(eval_items) if eval_items else 0, "seconds": round(seconds, 1),
                 "trainable_parameters": trainable, "total_parameters": total_params},
        command=command,
        pooling=head.pooling if task == "sequence-classification" else None,
        train_args={**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                    "train_file": Path(train_file).name, "eval_file": Path(eval_file).name if eval_file else None,
                    "val_fraction": val_fraction},
    )
    # PEFT records the folder it loaded from; for the bundled base that is a site-packages path.
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    # PEFT keeps target_modules as a set and writes it in hash-seed order: sorted, one training run writes the
    # same adapter_config.json in every process (the build cache keys on the adapter's bytes)
    saved_config = peft_model.peft_config["default"]
    if isinstance(saved_config.target_modules, (set, frozenset)):
        saved_config.target_modules = sorted(saved_config.target_modules)
    with atomic_output_dir(output, force=force) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        write_record(record, tmp)
    return TrainResult(Path(output), history, trainable, total_params, seconds, peft_model)
