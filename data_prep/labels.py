"""What a row's label means for each problem type, checked row by row with one-line errors.

single_label: one class name per row (today's behaviour). multi_label: a set of class names per row (a list, or
a delimited string with --label-separator); an empty set is allowed. regression: one finite number per row.
``auto`` is single_label that refuses, naming ``--task``, the values a single-label run would silently misread:
lists (multi-label data) and numbers with a fraction (regression targets).
"""

from __future__ import annotations

import json
import math

from data_prep.errors import DataPrepError

PROBLEM_TYPES = ("single_label", "multi_label", "regression")
TASK_CHOICES = ("auto",) + PROBLEM_TYPES


def label_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _shown(value) -> str:
    """A label as the user wrote it: JSON for lists and dicts (``["pos", "sport"]``), repr for the rest."""
    if isinstance(value, (list, tuple, dict)):
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value) -> str:
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes"
    return f"a {type(value).__name__}"


def _refuse_unusable(value, loc: str, what: str = "label") -> None:
    """dict and bytes labels mean a wrong column or a wrong reader in every task."""
    if isinstance(value, (dict, bytes, bytearray, memoryview)):
        raise DataPrepError(f"{loc}: {what} {_shown(value)} is {_kind(value)}; a label must be text or a number "
                            "(or, for --task multi_label, a list of them); check --label-column")


def _is_decimal_text(text: str) -> bool:
    """'0.37', '-1.5e3': text that reads as a number with a fraction (not '3', not 'nan', not a class name)."""
    try:
        number = float(text)
    except ValueError:
        return False
    return math.isfinite(number) and not number.is_integer()


def single_label(value, loc: str, task: str) -> str:
    """The class name of a single-label row. ``task`` is "auto" or "single_label"."""
    _refuse_unusable(value, loc)
    if isinstance(value, (list, tuple)):
        raise DataPrepError(f"{loc}: label {_shown(value)} is a list; for multi-label data pass --task multi_label")
    if isinstance(value, float) and not value.is_integer():
        # one class per distinct float would train nonsense (and usually fails at the split)
        raise DataPrepError(f"{loc}: label {value!r} is a number with a fraction; for a numeric target pass "
                            "--task regression")
    name = label_text(value)
    if task == "auto" and isinstance(value, str) and _is_decimal_text(name):
        raise DataPrepError(f"{loc}: label {name!r} reads as a number with a fraction; for a numeric target pass "
                            "--task regression, or --task single_label to use such values as class names")
    return name


def multi_label(value, loc: str, separator: str | None) -> list[str]:
    """The sorted, de-duplicated label set of a multi-label row (may be empty)."""
    _refuse_unusable(value, loc)
    if isinstance(value, str):
        if separator is None:
            raise DataPrepError(f"{loc}: label {value!r} is text, not a list; pass --label-separator (e.g. "
                                "--label-separator ';') to split it into labels")
        parts = value.split(separator)
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise DataPrepError(f"{loc}: label {_shown(value)} is {_kind(value)}; --task multi_label needs a list of "
                            "labels (or text split by --label-separator)")
    names = set()
    for part in parts:
        if part is None or isinstance(part, (list, tuple)) or (isinstance(part, float) and not part.is_integer()):
            raise DataPrepError(f"{loc}: label {_shown(value)} holds {_shown(part)}; each label in the list must "
                                "be text or a whole number")
        _refuse_unusable(part, loc, "label element")
        name = label_text(part)
        if name:  # "a;;b" and "a; " hold no label between the separators
            names.add(name)
    return sorted(names)


def multi_label_key(names: list[str]) -> str:
    """A label set as one string (unambiguous whatever the names hold), so sets can be stored as small codes."""
    return json.dumps(names, ensure_ascii=False)


def regression_target(value, loc: str) -> float:
    _refuse_unusable(value, loc)
    if isinstance(value, bool) or isinstance(value, (list, tuple)):
        raise DataPrepError(f"{loc}: label {_shown(value)} is not a number; --task regression needs a numeric label")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise DataPrepError(f"{loc}: label {_shown(value)} is not a number; --task regression needs a numeric "
                                "label") from None
    if not math.isfinite(number):
        raise DataPrepError(f"{loc}: label {_shown(value)} is not a finite number; --task regression needs finite "
                            "targets")
    return number


def target_stats(values) -> dict:
    """min, max, mean and population std of regression targets (std 0.0 when constant)."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    if not arr.size:
        return {"min": None, "max": None, "mean": None, "std": None}
    return {"min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean()), "std": float(arr.std())}
