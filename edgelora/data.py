"""Training and evaluation data: TSV, CSV and JSONL files.

Classification files have a text column (``sentence`` or ``text`` unless named) and a label
column (``label``). TSV files are split on their single tab per line, as ``../shared/data`` is
written (no quoting). Causal-LM files are JSONL with ``{"prompt", "completion"}`` (or ``{"text"}``)
per line, or plain ``.txt``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeloraError

TEXT_COLUMNS = ("sentence", "text")


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class LMExample:
    prompt: str  # not trained on (loss masked); may be empty
    completion: str


def _check_file(path: Path) -> None:
    if not path.exists():
        raise EdgeloraError(f"data file {path} does not exist; check the path")
    if path.is_dir():
        raise EdgeloraError(f"data file {path} is a folder; pass a .tsv, .csv or .jsonl file")
    if not path.is_file():
        raise EdgeloraError(f"data file {path} is not a regular file (a pipe or a device); pass a .tsv, .csv or "
                            ".jsonl file")


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """(columns, rows, each row's line number) of a table file. A TSV/CSV row has every column; a JSONL row has
    its own keys (``columns`` are the first row's), so a reader checks each row for the keys it needs
    (:func:`require`)."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeloraError(f"cannot read {path} as UTF-8 text ({exc}); re-save it as UTF-8") from None
    if suffix == ".jsonl":
        rows: list[dict[str, str]] = []
        numbers: list[int] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EdgeloraError(f"{path} line {n} is not valid JSON ({exc.msg}); fix that line") from None
            if not isinstance(obj, dict):
                raise EdgeloraError(f"{path} line {n} must be a JSON object")
            rows.append({str(k): "" if v is None else str(v) for k, v in obj.items()})
            numbers.append(n)
        columns = list(rows[0]) if rows else []
        return columns, rows, numbers
    if suffix in (".tsv", ".csv"):
        lines = text.splitlines()
        if not lines:
            raise EdgeloraError(f"{path} is empty; it needs a header line and rows")
        if suffix == ".tsv":
            table = [line.split("\t") for line in lines if line != ""]
        else:
            table = [r for r in csv.reader(lines) if r]
        header, body = table[0], table[1:]
        rows, numbers = [], []
        for n, fields in enumerate(body, 2):
            if len(fields) != len(header):
                raise EdgeloraError(
                    f"{path} line {n} has {len(fields)} fields, the header has {len(header)}; fix that line"
                )
            rows.append(dict(zip(header, fields, strict=True)))
            numbers.append(n)
        return header, rows, numbers
    raise EdgeloraError(f"{path}: unknown data format {suffix!r}; use .tsv, .csv or .jsonl")


def require(path: Path, rows: Sequence[dict[str, str]], numbers: Sequence[int], keys: Sequence[str]) -> None:
    """Every row has every key in ``keys``: a JSONL row may lack one its first row has, which would otherwise
    surface as a ``KeyError`` deep in training or calibration."""
    for row, n in zip(rows, numbers, strict=True):
        missing = next((k for k in keys if k not in row), None)
        if missing is not None:
            raise EdgeloraError(f"{path} line {n} has no {missing!r} key (keys: {', '.join(row) or 'none'}); add it "
                                "to that row or remove the row")


def read_classification(
    path: str | Path, text_column: str | None = None, label_column: str = "label"
) -> list[Example]:
    """Read ``(text, label)`` examples; labels are kept as strings."""
    path = Path(path)
    _check_file(path)
    columns, rows, numbers = _rows(path)
    if not rows:
        raise EdgeloraError(f"{path} has no examples; add rows under the header")
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise EdgeloraError(
                f"{path} has no 'sentence' or 'text' column (columns: {', '.join(columns)}); "
                "pass --text-column"
            )
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in columns:
            raise EdgeloraError(f"{path} has no column {col!r} (columns: {', '.join(columns)}); pass {flag}")
    require(path, rows, numbers, (text_column, label_column))
    out = []
    for n, row in enumerate(rows, 1):
        label = row[label_column].strip()
        if label == "":
            raise EdgeloraError(f"{path} example {n} has an empty label; fix or remove it")
        out.append(Example(row[text_column], label))
    return out


def read_lm(path: str | Path) -> list[LMExample]:
    """Read causal-LM examples: JSONL prompt/completion (or text) per line, or a plain .txt file."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise EdgeloraError(f"{path} is empty; add training text")
        return [LMExample("", text)]
    columns, rows, numbers = _rows(path)
    if not rows:
        raise EdgeloraError(f"{path} has no examples")
    out = []
    for n, row in zip(numbers, rows, strict=True):
        if "completion" in row:
            out.append(LMExample(row.get("prompt", ""), row["completion"]))
        elif "text" in row:
            out.append(LMExample("", row["text"]))
        else:
            raise EdgeloraError(
                f"{path} line {n} has neither 'completion' nor 'text' (keys: {', '.join(row)}); "
                'write {"prompt": ..., "completion": ...} per line'
            )
    return out


def split(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed-seed random split: (train, validation) with ``fraction`` of the items in validation."""
    if not 0.0 < fraction < 1.0:
        raise EdgeloraError(f"--val-fraction is {fraction}; it must be between 0 and 1")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * fraction))
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]
