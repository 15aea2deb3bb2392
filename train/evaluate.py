"""Score an exported model on a prepared split and write the reports.

    python -m train.evaluate --model runs/bbc/best --data data/bbc --split test

Writes metrics.json (document- and window-level metrics of the model's problem type), classification_report.txt,
predictions.csv (one row per document) and, for single-label models, confusion_matrix.png (counts and the
row-normalised view) into --output-dir, and prints the report. When the reports go to the default
<model>/eval-<split>, the export's model card (<model>/README.md) is rewritten to list this split's metrics.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.prepare import read_manifest
from data_prep.tokenizer import tokenizer_fingerprint
from train.data import load_split
from train.evaluation import classification_report_text, confusion_matrix_image, score
from train.export import EXPORT_INFO
from train.inference import (TARGET_COLUMN, InferenceError, check_pooling, check_positive, check_threshold,
                             csv_cell, decision_thresholds, forward_documents, load_export, prediction)
from train.model_card import write_model_card


# The figures printed on the summary line, per problem type (document level unless named window_).
SUMMARY_METRICS = {"single_label": ("doc_accuracy", "doc_f1_macro", "window_accuracy"),
                   "multi_label": ("doc_f1_micro", "doc_f1_macro", "doc_subset_accuracy"),
                   "regression": ("doc_mse", "doc_mae", "doc_pearson", "doc_spearman")}


FILES_HELP = """files written into --output-dir (default <model>/eval-<split>):
  metrics.json               document- and window-level metrics of the model's problem type, with the pooling
                             (and the thresholds of a multi-label model)
  classification_report.txt  per-label precision/recall/F1 and support, or (regression) MSE, MAE,
                             Pearson and Spearman
  predictions.csv            one row per document: id, the true label(s) or value, predicted, prob_<label>...,
                             windows
  confusion_matrix.png       single-label models only: counts and the row-normalised view side by side
With the default --output-dir, <model>/README.md (the model card) is rewritten to list every eval-*/metrics.json
in the model folder. Exit status 0, or 2 with one error line."""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FILES_HELP)
    p.add_argument("--model", required=True, help="an exported model folder (output_dir/best)")
    p.add_argument("--data", required=True, help="a data_prep output folder")
    p.add_argument("--split", default="test", help="split to score. Default: test")
    p.add_argument("--output-dir", default=None, help="where to write the reports. Default: <model>/eval-<split>")
    p.add_argument("--pooling", choices=("mean", "max", "max_positive"), default=None,
                   help="single-label mean, max or max_positive (2 classes); multi-label max or mean; regression "
                        "mean. Default: as in training (a document-objective model: its document head; --pooling pools its "
                        "per-window outputs instead)")
    p.add_argument("--threshold", type=float, default=None,
                   help="multi-label models: a label is predicted when its probability >= this, for every label. "
                        "Default: the export's thresholds (0.5 if it records none)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass. Default: 64")
    p.add_argument("--device", default=None, help="cpu, cuda, ... Default: cuda if available")
    args = p.parse_args(argv)
    out = Path(args.output_dir or Path(args.model) / f"eval-{args.split}")
    try:
        check_positive({"--batch-size": args.batch_size})
        check_threshold(args.threshold)
        if out.exists() and not out.is_dir():
            raise InferenceError(f"--output-dir {out}: is a file, not a folder")
        model, tokenizer, info = load_export(args.model, args.device)
        problem_type, label_names = info["problem_type"], info["labels"]
        thresholds = decision_thresholds(args.threshold, info)
        pooling = check_pooling(args.pooling, info) if args.pooling else check_pooling(
            info["pooling"], info, "bertfit.json pooling")
        manifest = read_manifest(args.data)
        check_same_tokenizer(args.data, manifest, info.get("tokenizer_fingerprint") or tokenizer_fingerprint(tokenizer))
        check_same_task(args.data, manifest, info)
        if args.split not in manifest["splits"]:
            raise InferenceError(f"--split {args.split}: no such split in --data {args.data}; available splits: "
                                 f"{', '.join(manifest['splits'])}")
        ds = load_split(args.data, args.split, manifest)
        types = ds["token_type_ids"] if "token_type_ids" in ds.column_names else None
        input_ids = ds["input_ids"]
        doc_ids = np.asarray(ds["doc_id"])
        logits, doc_logits = forward_documents(model, input_ids, types, doc_ids, tokenizer.pad_token_id,
                                               args.batch_size)
        if args.pooling:  # a window pooling asked for: not the document head of a document-objective model
            doc_logits = None
        labels, doc_ids = label_array(ds["label"], problem_type), np.asarray(ds["doc_id"])
        window_tokens = (np.asarray(ds["length"]) if "length" in ds.column_names
                         else np.asarray([len(w) for w in input_ids]))  # regression's mean weights, as in training
        try:
            metrics, extras = score(logits, labels, doc_ids, problem_type, label_names, pooling, window_tokens,
                                    thresholds, doc_logits=doc_logits)
        except ValueError as exc:  # e.g. a pooling the label count does not allow
            raise InferenceError(f"--pooling {pooling}: {exc}") from None
        if doc_logits is not None:
            pooling = f"document head ({info.get('doc_pooler')})"
        metrics = {"split": args.split, "problem_type": problem_type, "pooling": pooling, **metrics}
        if thresholds is not None:
            metrics["thresholds"] = dict(zip(label_names, thresholds))
        ids = np.asarray(extras["doc_ids"])
        first = {d: i for i, d in reversed(list(enumerate(doc_ids)))}
        names = np.asarray(ds["id"])[[first[d] for d in ids]]
        windows = dict(zip(*np.unique(doc_ids, return_counts=True)))
        report = classification_report_text(extras["doc_outputs"], extras["doc_labels"], problem_type, label_names,
                                            thresholds)
        # Every report is made in memory first, then all are written under temporary names and renamed: an
        # error part-way leaves the folder as it was, never a metrics.json beside a stale predictions.csv.
        files = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
                 "classification_report.txt": report.encode(),
                 "predictions.csv": predictions_csv(names, extras["doc_labels"], extras["doc_outputs"],
                                                    [windows[d] for d in ids], label_names, problem_type, thresholds)}
        if problem_type == "single_label":  # counts and the row-normalised view side by side, one file
            matrix = extras["confusion"]
            files["confusion_matrix.png"] = png_bytes(side_by_side(
                confusion_matrix_image(matrix, label_names), confusion_matrix_image(matrix, label_names,
                                                                                    normalize=True)))
        write_files_atomically(out, files)
    except (InferenceError, DataPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"documents ({int(metrics['num_docs'])}, {pooling} pooling over {int(metrics['num_windows'])} windows):")
    print(report)
    summary = " ".join(f"{name}={metrics[name]:.4f}" for name in SUMMARY_METRICS[problem_type] if name in metrics)
    print(f"evaluate: {summary} -> {out}")
    update_model_card(Path(args.model), out)
    return 0


def update_model_card(model_dir: Path, out: Path) -> None:
    """Rewrite the export's model card when these reports are among the ones it lists (model_dir/eval-*); the
    reports are already written, so a card that cannot be made is a warning, not a failure."""
    if not (out.name.startswith("eval-") and out.resolve().parent == model_dir.resolve()):
        return  # reports kept elsewhere are not in the card
    if not (model_dir / EXPORT_INFO).is_file():
        return  # a plain save_pretrained folder: no bertfit.json to make a card from
    try:
        card = write_model_card(model_dir)
    except (ValueError, OSError) as exc:
        print(f"warning: model card not updated: {exc}", file=sys.stderr)
        return
    print(f"evaluate: model card -> {card}")


def check_same_task(data_dir: str, manifest: dict, info: dict) -> None:
    """The split must be what the model was trained for: same problem type, labels, text inputs (single or
    pair) and cleaning; otherwise the scores would silently measure something else."""
    data_type = manifest.get("problem_type", "single_label")  # manifests without the key are single-label
    if data_type != info["problem_type"]:
        raise InferenceError(f"--data {data_dir} is {data_type} data, the model is a {info['problem_type']} model")
    if info["problem_type"] != "regression" and manifest["labels"] != info["labels"]:
        raise InferenceError(f"--data {data_dir} has labels {manifest['labels']}, the model {info['labels']}")
    data_task = manifest.get("task", "single")
    if data_task != info["task"]:
        raise InferenceError(f"--data {data_dir} holds {'text pairs' if data_task == 'pair' else 'single texts'}, "
                             f"the model was trained on {'text pairs' if info['task'] == 'pair' else 'single texts'}")
    data_clean = tuple(manifest.get("clean") or ())
    if data_clean != info["clean"]:
        raise InferenceError(f"--data {data_dir} was cleaned with --clean {','.join(data_clean) or '(none)'}, the "
                             f"model's data with {','.join(info['clean']) or '(none)'}; re-run data_prep with the "
                             "model's --clean")


def label_array(column, problem_type: str) -> np.ndarray:
    """The shards' label column as scoring takes it: class ids [N], multi-hot rows [N, L] or values [N]."""
    dtype = {"single_label": np.int64, "multi_label": np.int8, "regression": np.float64}[problem_type]
    return np.asarray(column, dtype=dtype)


def check_same_tokenizer(data_dir: str, manifest: dict, model_fingerprint: str) -> None:
    """The shards hold token ids: they mean the same to the model only if made by the model's tokenizer."""
    tokenizer = manifest["tokenizer"] if isinstance(manifest["tokenizer"], dict) else {}
    data_fingerprint = tokenizer.get("fingerprint")
    if not isinstance(data_fingerprint, str):
        raise InferenceError(f"--data {data_dir}: manifest.json records no tokenizer fingerprint; re-run data_prep")
    if data_fingerprint != model_fingerprint:
        raise InferenceError(f"--data {data_dir} was prepared with another tokenizer "
                             f"({tokenizer.get('name_or_path', '?')}, fingerprint {data_fingerprint[:19]}...) than "
                             f"the model's (fingerprint {model_fingerprint[:19]}...)")


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Two RGB images in one, the shorter padded with white at the bottom."""
    height = max(left.shape[0], right.shape[0])
    pad = [np.pad(img, ((0, height - img.shape[0]), (0, 0), (0, 0)), constant_values=255) for img in (left, right)]
    return np.concatenate(pad, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, image, format="png")
    return buffer.getvalue()


def predictions_csv(names, doc_labels, doc_outputs, windows, label_names: list[str], problem_type: str,
                    thresholds: list[float] | None) -> bytes:
    """One row per document: the true label(s)/value, the prediction, predict's probability columns, windows.
    single-label: id, label, predicted, prob_<label>..., windows; multi-label: id, labels, predicted (both
    ';'-joined sets), prob_<label>..., windows; regression: id, value, predicted, windows."""
    buffer = io.StringIO(newline="")
    w = csv.writer(buffer)
    probs = [] if problem_type == "regression" else [f"prob_{n}" for n in label_names]
    w.writerow(["id", TARGET_COLUMN[problem_type], "predicted", *probs, "windows"])
    for name, y, out, n in zip(names, doc_labels, doc_outputs, windows):
        if problem_type == "single_label":
            true = label_names[int(y)]
        elif problem_type == "multi_label":
            true = [lab for lab, on in zip(label_names, y) if on]
        else:
            true, out = float(y), float(out)
        predicted = prediction(problem_type, label_names, thresholds, out)
        w.writerow([name, csv_cell(true), csv_cell(predicted), *([] if problem_type == "regression" else
                                                                  [f"{x:.6f}" for x in out]), int(n)])
    return buffer.getvalue().encode()


def write_files_atomically(out: Path, files: dict[str, bytes]) -> None:
    """Write every file under a temporary name in ``out``, then rename them all; on any error remove the
    temporary files (and ``out`` if this call created it)."""
    for name in files:  # the one likely reason a rename fails half-way through: check it first
        if (out / name).is_dir():
            raise InferenceError(f"--output-dir {out}: {name} is a folder; cannot write the report there")
    created = not out.exists()
    temporary = {name: out / f".{name}.tmp-{os.getpid()}" for name in files}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            temporary[name].write_bytes(data)
        for name in files:
            os.replace(temporary[name], out / name)
    except BaseException as exc:  # also Ctrl-C: no temporary file is left behind
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(exc, OSError):
            raise InferenceError(f"--output-dir {out}: cannot write: {exc.strerror or exc}") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
