"""The oldest release of each dependency bertfit works with: checked at start-up (one line, not an ImportError
or a wrong result deep inside a run), and the same list pyproject.toml's lower bounds must state
(tests/test_docs.py compares them). Each bound was found by running the test suite against older releases,
one package at a time (the closing note of the session that set them says which suite)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

MINIMUM = {
    "torch": "2.6",  # transformers' packed-sequence masks (and_mask_function) need it; fused AdamW on CPU needs 2.4
    "transformers": "5.7",  # ModernBERT honours set_attn_implementation from 5.7 (packing, cpu_dropout); 5.2 for
    # create_bidirectional_mask(inputs_embeds=); 5.1 for its sliding-window twin
    "tokenizers": "0.22.1",  # the oldest that installs beside transformers 5.x
    "accelerate": "1.0",
    "datasets": "2.19",
    "evaluate": "0.4.1",
    "jsonargparse": "4.48",  # older releases word unknown options differently ("Validation failed: ...")
    "scikit-learn": "1.4.2",  # older releases need numpy < 2
}


def outdated() -> list[str]:
    """'name X (needs >= Y)' for every installed dependency older than its minimum."""
    from packaging.version import Version

    found = []
    for name, minimum in MINIMUM.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # a missing package fails at its import with its own clear message
        if Version(installed) < Version(minimum):
            found.append(f"{name} {installed} (needs >= {minimum})")
    return found


def version_problem() -> str | None:
    """One line naming what to upgrade, or None."""
    old = outdated()
    if not old:
        return None
    return f"outdated packages: {', '.join(old)}; upgrade them (pip install -U {' '.join(n.split()[0] for n in old)})"
