"""Seeded, stratified split assignment by ratios, optionally grouped (a group never straddles splits)."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np

from data_prep.errors import DataPrepError

DEFAULT_RATIOS = {"train": 0.8, "validation": 0.1, "test": 0.1}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_split_name(name: str, where: str) -> str:
    """A split name becomes a folder name under --output, so it must be plain: no path, no dots, not empty."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise DataPrepError(f"{where}: split name {name!r} is not a plain name (use letters, digits, _ and -)")
    return name


def parse_ratios(value: str) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for part in value.split(","):
        name, sep, num = part.partition("=")
        name = name.strip()
        try:
            r = float(num)
        except ValueError:
            r = float("nan")
        if not sep or not name or not math.isfinite(r) or r < 0:
            raise ValueError(f"--split-ratios: cannot read {part!r}; expected NAME=FRACTION, e.g. "
                             "train=0.8,validation=0.1,test=0.1")
        if name in ratios:
            raise ValueError(f"--split-ratios: split {name!r} given twice")
        ratios[name] = r
    total = sum(ratios.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"--split-ratios: fractions sum to {total:g}, not 1")
    return ratios


def _largest_remainder(n: int, ratios: list[float]) -> list[int]:
    """Integer counts summing to n, proportional to ratios."""
    raw = [n * r for r in ratios]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(ratios)), key=lambda i: (raw[i] - counts[i], ratios[i]), reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(labels: list[int], groups: list[str] | None, ratios: dict[str, float],
                  seed: int) -> np.ndarray:
    """Split index (into ``list(ratios)``) for every row.

    Without groups: per label, rows are shuffled with ``seed`` and cut by largest-remainder counts, so every
    split gets each label in proportion. With groups: whole groups are assigned, larger groups first, each to
    the split whose label counts are furthest below target, so splits stay close to stratified.
    """
    rng = np.random.default_rng(seed)
    names = list(ratios)
    weights = [ratios[k] for k in names]
    out = np.full(len(labels), -1, dtype=np.int64)
    if groups is None:
        by_label: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_label[y].append(i)
        for y in sorted(by_label):
            rows = np.asarray(by_label[y])
            rng.shuffle(rows)
            counts = _largest_remainder(len(rows), weights)
            start = 0
            for s, c in enumerate(counts):
                out[rows[start:start + c]] = s
                start += c
        return out

    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    keys = sorted(members)
    order = rng.permutation(len(keys))
    # larger groups first (stable on the shuffled order), so small groups fill the gaps at the end
    order = sorted(order, key=lambda k: -len(members[keys[k]]))
    num_labels = max(labels) + 1 if labels else 0
    target = np.outer(weights, np.bincount(labels, minlength=num_labels))  # [split, label]
    have = np.zeros_like(target)
    total_target = target.sum(axis=1)
    for k in order:
        rows = members[keys[k]]
        counts = np.bincount([labels[i] for i in rows], minlength=num_labels)
        # deficit in the labels this group carries, relative to the split's size; ties -> larger ratio
        deficit = ((target - have) * (counts > 0)).sum(axis=1) / np.maximum(total_target, 1e-9)
        s = int(np.argmax(deficit + 1e-12 * np.asarray(weights)))
        out[rows] = s
        have[s] += counts
    return out
