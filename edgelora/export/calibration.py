"""``--calibrate``: the texts a static int8 (QDQ) target is calibrated and checked on, per task.

A file is read as texts only: a ``.txt`` file one text per line, or a labelled TSV/CSV/JSONL (a ``sentence`` or
``text`` column; a task's training or eval file) whose labels are ignored. Its rows are shuffled with a fixed
seed and split: the first ``calibration_samples`` feed the calibrator; of the rest (up to four times
``check_samples``) the longest ``check_samples`` are the held-out texts the sensitivity pass checks each task's
decisions on (against the fp32 engine, not against labels: no labelled data is tuned on). ``--calibrate FILE``
serves every task; ``--calibrate NAME=FILE`` one task.

The calibration batches are padded to the target's sequence length; the checks run at their own length, as the
device does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgeloraError

BATCH = 16


def read_texts(path: Path) -> list[str]:
    """The texts of a calibration file, or a one-line error naming it."""
    if not path.is_file():
        raise EdgeloraError(f"--calibrate: file {path} does not exist; pass a .txt (one text per line) or a "
                            "TSV/CSV/JSONL with a 'sentence' or 'text' column")
    if path.suffix == ".txt":
        try:
            texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise EdgeloraError(f"--calibrate: {path} is not UTF-8 text; pass a UTF-8 .txt, one text per "
                                "line") from None
        texts = [t for t in texts if t]
    else:
        from ..data import TEXT_COLUMNS, _rows, require

        columns, rows, numbers = _rows(path)
        column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if column is None:
            raise EdgeloraError(f"--calibrate: {path} has no 'sentence' or 'text' column (columns: "
                                f"{', '.join(columns) or 'none'}); add one, or pass a .txt with one text per line")
        require(path, rows, numbers, (column,))
        texts = [r[column].strip() for r in rows if r[column].strip()]
    if len(texts) < 2:
        raise EdgeloraError(f"--calibrate: {path} has {len(texts)} text(s); static int8 needs at least 2 (some to "
                            "calibrate on, some to check), a few hundred to calibrate well")
    return texts


def calibration_files(calibrate: Mapping[str, Path], tasks: list[str]) -> dict[str, Path]:
    """task -> its file: ``""`` (a bare ``--calibrate FILE``) serves every task not named."""
    unknown = sorted(set(calibrate) - set(tasks) - {""})
    if unknown:
        raise EdgeloraError(f"--calibrate {unknown[0]}=...: no adapter named {unknown[0]!r}; names: {', '.join(tasks)}")
    files = {t: calibrate.get(t, calibrate.get("")) for t in tasks}
    missing = [t for t, f in files.items() if f is None]
    if missing:
        raise EdgeloraError(f"static int8 needs calibration texts for task {missing[0]!r}: pass --calibrate "
                            f"{missing[0]}=FILE (its training texts, or any text it will see), or --calibrate FILE")
    return {t: Path(f) for t, f in files.items() if f is not None}


def build_calibration(texts: Mapping[str, list[str]], tasks: Mapping[str, tuple[Any, Any]],
                      w0: Mapping[str, np.ndarray], tokenizer: Any, q: Any, sequence: int) -> Any:
    """The ``CalibrationSet``: calibration batches from every task's texts; one check per task with a head
    (``tasks``: name -> (its LoRA modules, its head tensors, what its head reads))."""
    from ..converters.onnx.calibrate import CalibrationSet, Check

    batches: list[dict[str, np.ndarray]] = []
    checks = []
    for name, all_texts in texts.items():
        order = np.random.default_rng(0).permutation(len(all_texts))
        shuffled = [all_texts[i] for i in order]
        n_cal = min(q.calibration_samples, max(1, len(shuffled) // 2))
        # the checks: the longest of up to four times check_samples held-out texts. Long inputs are where 8-bit
        # activations lose decisions (W1: SST-2's 20+ word sentences lost 0.59 points where a random draw of
        # mostly short training phrases passed the check), so that is what the pass holds to the bound
        cal, pool = shuffled[:n_cal], shuffled[n_cal:n_cal + 4 * q.check_samples]
        held = sorted(pool, key=lambda t: -len(t.split()))[:q.check_samples]
        # padded to the target's sequence length: the histogram calibrators stack their batches (one shape), and
        # MinMax measured worse at each text's own length (W1: SST-2's long-text check agreement 0.93 vs 0.957
        # before the pass): the padded positions' wider ranges cover the long inputs a phrase-heavy sample lacks
        batches += [_encode(tokenizer, cal[i:i + BATCH], sequence, fixed=True) for i in range(0, len(cal), BATCH)]
        modules, head, pooling = tasks[name]
        if head:
            feeds = [_encode(tokenizer, held[i:i + 32], sequence, fixed=False) for i in range(0, len(held), 32)]
            checks.append(Check(name, feeds, modules, head, pooling))
    return CalibrationSet(batches, tuple(checks), dict(w0))


def _encode(tokenizer: Any, texts: list[str], sequence: int, fixed: bool) -> dict[str, np.ndarray]:
    from ..runtime.text import clip_text

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=True, max_length=sequence)["input_ids"])

    texts = [clip_text(t, sequence, count) for t in texts]  # a 4 MB line: 128 ids, not 1.5 GB of them
    enc = tokenizer(texts, padding="max_length" if fixed else True, truncation=True, max_length=sequence,
                    return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
