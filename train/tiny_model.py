"""A tiny randomly initialised BERT with its own small WordPiece vocabulary, and a synthetic labeled corpus
it can learn in seconds on a CPU. For smoke runs and tests (no download, no real model needed).

    python -m train.tiny_model --out runs/tiny          # writes runs/tiny/model/ and runs/tiny/data.csv
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Words that carry the label (one list per class) and neutral filler shared by all classes.
CLASS_WORDS = [
    ["good", "great", "happy", "love", "excellent", "fine", "bright", "win"],
    ["bad", "awful", "sad", "hate", "terrible", "poor", "dark", "lose"],
    ["ball", "team", "match", "goal", "coach", "score", "league", "player"],
    ["bank", "market", "stock", "price", "trade", "profit", "share", "deal"],
    ["vote", "law", "party", "minister", "election", "policy", "court", "state"],
]
FILLER = ["the", "a", "and", "of", "to", "in", "it", "is", "was", "for", "on", "with", "as", "at", "by", "this",
          "that", "from", "or", "but", "not", "are", "day", "time", "year", "people", "way", "thing", "world",
          "life", "work", "part", "place", "case", "week", "story", "news", "report", "film", "book"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def tiny_vocab() -> list[str]:
    words = [w for ws in CLASS_WORDS for w in ws] + FILLER
    pieces = LETTERS + ["##" + c for c in LETTERS]  # any lowercase word/number still tokenizes
    punct = list(".,!?;:'\"()-")
    return list(dict.fromkeys(SPECIAL + punct + pieces + sorted(set(words))))  # unique, in order


def build_tiny_model(out_dir: str | Path, num_labels: int = 2, seed: int = 0, hidden: int = 32, layers: int = 2,
                     max_position: int = 512) -> Path:
    """Write a tiny BERT (random weights, fixed seed) and its tokenizer to ``out_dir``; returns the path."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_position)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=hidden * 2, max_position_embeddings=max_position, num_labels=num_labels,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = BertForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def synthetic_texts(n_docs: int, num_labels: int = 2, seed: int = 0, min_words: int = 8, max_words: int = 60,
                    signal: float = 0.25) -> list[tuple[str, int]]:
    """(text, label) pairs: filler words with a share ``signal`` of the label's own words mixed in."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_docs):
        label = i % num_labels
        n = rng.randint(min_words, max_words)
        words = [rng.choice(CLASS_WORDS[label]) if rng.random() < signal else rng.choice(FILLER) for _ in range(n)]
        rows.append((" ".join(words) + ".", label))
    return rows


def write_synthetic_csv(path: str | Path, n_docs: int, num_labels: int = 2, seed: int = 0, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "label"])
        for i, (text, label) in enumerate(synthetic_texts(n_docs, num_labels, seed, **kwargs)):
            w.writerow([f"doc{i:06d}", text, f"class{label}"])
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.tiny_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write model/ and data.csv into")
    p.add_argument("--num-labels", type=int, default=2, help="number of classes (2-5). Default: 2")
    p.add_argument("--docs", type=int, default=400, help="synthetic documents in data.csv. Default: 400")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and texts. Default: 0")
    args = p.parse_args(argv)
    if not 2 <= args.num_labels <= len(CLASS_WORDS):
        p.error(f"--num-labels must be between 2 and {len(CLASS_WORDS)}")
    model = build_tiny_model(Path(args.out) / "model", num_labels=args.num_labels, seed=args.seed)
    data = write_synthetic_csv(Path(args.out) / "data.csv", args.docs, args.num_labels, args.seed)
    print(f"tiny model: {model}\nsynthetic data: {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
