"""``python -m train.evaluate``: score an exported model on a prepared split.

    python -m train.evaluate --model runs/bbc/best --data data/bbc --split test

Writes metrics.json (document- and window-level), classification_report.txt, confusion_matrix.png and
predictions.csv (one row per document) into --output-dir, and prints the report.
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
from train.evaluation import confusion_matrix_image, pool_document_logits, score
from train.inference import InferenceError, check_positive, forward_windows, load_export


def classification_report(probs: np.ndarray, labels: np.ndarray, label_names: list[str]) -> str:
    """Per-class precision/recall/F1/support plus macro averages and accuracy, via the project's metrics."""
    from train.metrics import load_classification_metrics

    modules = load_classification_metrics()
    pred = probs.argmax(1)
    ids = list(range(len(label_names)))
    per = modules["precision_recall_f1"].compute(predictions=pred, references=labels, labels=ids, average=None)
    support = np.bincount(labels, minlength=len(label_names))
    width = max(12, *(len(n) for n in label_names))
    lines = [f"{'':>{width}}  precision  recall  f1-score  support", ""]
    for i, name in enumerate(label_names):
        lines.append(f"{name:>{width}}  {per['precision'][i]:9.4f}  {per['recall'][i]:6.4f}  {per['f1'][i]:8.4f}"
                     f"  {support[i]:7d}")
    acc = modules["accuracy"].compute(predictions=pred, references=labels)["accuracy"]
    lines += ["", f"{'accuracy':>{width}}  {'':9}  {'':6}  {acc:8.4f}  {support.sum():7d}",
              f"{'macro avg':>{width}}  {np.mean(per['precision']):9.4f}  {np.mean(per['recall']):6.4f}  "
              f"{np.mean(per['f1']):8.4f}  {support.sum():7d}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model folder (output_dir/best)")
    p.add_argument("--data", required=True, help="a data_prep output folder")
    p.add_argument("--split", default="test", help="split to score. Default: test")
    p.add_argument("--output-dir", default=None, help="where to write the reports. Default: <model>/eval-<split>")
    p.add_argument("--pooling", choices=("mean", "max"), default=None, help="Default: as in training")
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward pass. Default: 64")
    p.add_argument("--device", default=None, help="cpu, cuda, ... Default: cuda if available")
    args = p.parse_args(argv)
    out = Path(args.output_dir or Path(args.model) / f"eval-{args.split}")
    try:
        check_positive({"--batch-size": args.batch_size})
        if out.exists() and not out.is_dir():
            raise InferenceError(f"--output-dir {out}: is a file, not a folder")
        model, tokenizer, info = load_export(args.model, args.device)
        manifest = read_manifest(args.data)
        check_same_tokenizer(args.data, manifest, info.get("tokenizer_fingerprint") or tokenizer_fingerprint(tokenizer))
        if manifest["labels"] != info["labels"]:
            raise InferenceError(f"--data {args.data} has labels {manifest['labels']}, the model {info['labels']}")
        if args.split not in manifest["splits"]:
            raise InferenceError(f"--split {args.split}: no such split in --data {args.data}; available splits: "
                                 f"{', '.join(manifest['splits'])}")
        ds = load_split(args.data, args.split, manifest)
        pooling = args.pooling or info["pooling"]
        types = ds["token_type_ids"] if "token_type_ids" in ds.column_names else None
        logits = forward_windows(model, ds["input_ids"], types, tokenizer.pad_token_id, args.batch_size)
        labels, doc_ids = np.asarray(ds["label"]), np.asarray(ds["doc_id"])
        metrics, matrix = score(logits, labels, doc_ids, info["labels"], pooling)
        metrics = {"split": args.split, "pooling": pooling, **metrics}
        ids, doc_probs = pool_document_logits(logits, doc_ids, pooling)
        first = {d: i for i, d in reversed(list(enumerate(doc_ids)))}
        doc_labels = labels[[first[d] for d in ids]]
        names = np.asarray(ds["id"])[[first[d] for d in ids]]
        report = classification_report(doc_probs, doc_labels, info["labels"])
        # Every report is made in memory first, then all are written under temporary names and renamed: an
        # error part-way leaves the folder as it was, never a metrics.json beside a stale predictions.csv.
        files = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
                 "classification_report.txt": report.encode(),
                 "confusion_matrix.png": png_bytes(confusion_matrix_image(matrix, info["labels"])),
                 "predictions.csv": predictions_csv(names, doc_labels, doc_probs, info["labels"])}
        write_files_atomically(out, files)
    except (InferenceError, DataPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"documents ({int(metrics['num_docs'])}, {pooling} pooling over {int(metrics['num_windows'])} windows):")
    print(report)
    print(f"evaluate: doc_accuracy={metrics['doc_accuracy']:.4f} doc_f1_macro={metrics['doc_f1_macro']:.4f} "
          f"window_accuracy={metrics['window_accuracy']:.4f} -> {out}")
    return 0


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


def png_bytes(image: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, image, format="png")
    return buffer.getvalue()


def predictions_csv(names, doc_labels, doc_probs, label_names: list[str]) -> bytes:
    buffer = io.StringIO(newline="")
    w = csv.writer(buffer)
    w.writerow(["id", "label", "predicted", *[f"prob_{n}" for n in label_names]])
    for name, y, pr in zip(names, doc_labels, doc_probs):
        w.writerow([name, label_names[y], label_names[int(pr.argmax())], *[f"{x:.6f}" for x in pr]])
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
