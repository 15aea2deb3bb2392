"""The export's model card: ``README.md`` in the Hugging Face Hub's model-card format (YAML front matter, then
Markdown), made from the folder's bertfit.json and every ``eval-<split>/metrics.json`` beside it.

The card names paths only by their last folder name: bertfit.json records the data folder as an absolute path
of the training machine, and a card is meant to be shared."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import yaml

from train.export import EXPORT_INFO, REGRESSION_OUTPUT, read_json_object

CARD_NAME = "README.md"
PLACEHOLDER_PATH = "path/to/best"  # the snippets' model path: the folder may be moved or pushed to the Hub

# Hub tags for bertfit's problem types (the Hub's own spelling for multi-label).
PROBLEM_TYPE_TAGS = {"single_label": "single-label-classification", "multi_label": "multi-label-classification",
                     "regression": "regression"}
PROBLEM_TYPE_WORDS = {"single_label": "single-label classifier (one label per document)",
                      "multi_label": "multi-label classifier (any set of labels per document)",
                      "regression": "regression model (one number per document)"}
# bertfit metric names (without doc_/window_) -> the Hub's metric ids (https://hf.co/metrics).
HUB_METRIC_TYPES = {"accuracy": "accuracy", "subset_accuracy": "accuracy", "f1": "f1", "precision": "precision",
                    "recall": "recall", "mse": "mse", "mae": "mae", "pearson": "pearsonr", "spearman": "spearmanr",
                    "loss": "loss"}
AVERAGES = ("macro", "micro", "samples", "binary", "weighted")
# The training config's fields worth a line in the card, in this order (the full config is train_config.yaml).
CARD_CONFIG_FIELDS = ("epochs", "max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
                      "weight_decay", "warmup_ratio", "warmup_steps", "max_grad_norm", "mixed_precision", "seed",
                      "pooling", "class_weights", "pos_weight", "threshold", "standardize_targets", "train_split",
                      "eval_split", "early_stopping")
CHUNKING_WORDS = {"max_length": "model input length in tokens, special tokens included",
                  "chunk_size": "content tokens per window",
                  "stride": "tokens between the starts of consecutive windows",
                  "min_chunk_tokens": "a document's last window is dropped below this many content tokens",
                  "max_text_tokens": "each document truncated to this many tokens before windowing",
                  "max_chunks_per_doc": "at most this many windows per document (the first ones)"}


def write_model_card(model_dir: str | Path) -> Path:
    """(Re)write ``model_dir/README.md`` from the folder's bertfit.json and its ``eval-*/metrics.json``; returns
    its path. Written under a temporary name and renamed, so a reader never sees half a card. Raises ValueError
    (one line naming the file) when bertfit.json or an evaluation's metrics.json is missing or damaged."""
    folder = Path(model_dir)
    if not (folder / EXPORT_INFO).is_file():
        raise ValueError(f"{folder}: no {EXPORT_INFO} (not a bertfit export)")
    info = read_json_object(folder / EXPORT_INFO)
    text = model_card_text(info, read_evaluations(folder))
    # a unique temporary name (two evaluate runs may rewrite the same card at once), created with open() rather
    # than mkstemp so the card gets the umask's permissions like the export's other files, not 0600
    tmp = folder / f".{CARD_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, folder / CARD_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / CARD_NAME


def read_evaluations(folder: Path) -> list[tuple[str, dict]]:
    """(split, metrics) of every ``eval-<split>/metrics.json`` in the folder, sorted by split."""
    found = []
    for path in sorted(folder.glob("eval-*/metrics.json")):
        try:
            metrics = read_json_object(path)
        except ValueError as exc:
            raise ValueError(f"{path.parent.name}/{exc}") from None
        split = metrics.get("split") if isinstance(metrics.get("split"), str) else path.parent.name[len("eval-"):]
        found.append((split, metrics))
    return found


def base_model_name(model: str | None) -> str | None:
    """The training config's ``model`` as the card names it: a Hub name or installed package name as given, a
    local folder by its name (``<package>/model``, how model packages ship, by the package's name)."""
    if not model:
        return None
    text = str(model).rstrip("/\\")
    path = Path(text).expanduser()
    looks_like_hub_name = (text.count("/") == 1 and not text.startswith((".", "~", "/"))
                           and all(part and not part.startswith(".") for part in text.split("/")))
    if looks_like_hub_name and not path.exists():
        return text
    if "/" not in text and "\\" not in text:
        return text  # an installed package or a bare folder name
    parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".", "..", "~")]
    if len(parts) >= 2 and parts[-1] == "model":
        return parts[-2]
    return parts[-1] if parts else None


def folder_name(path: str | None) -> str | None:
    if not path:
        return None
    return Path(str(path).rstrip("/\\")).name or None


def model_card_text(info: dict, evaluations: list[tuple[str, dict]]) -> str:
    """The whole card: front matter, then Markdown."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    problem_type = info.get("problem_type", "single_label")
    labels = list(info.get("labels") or [])
    base = base_model_name(config.get("model"))
    data_name = folder_name(info.get("data") or config.get("data")) or "data"
    name = folder_name(config.get("output_dir")) or "bertfit-model"
    validation_split = config.get("eval_split") or "validation"
    splits = []  # (split, dataset name, metrics, where the numbers come from)
    if info.get("metrics"):
        step = info.get("step")
        splits.append((validation_split, data_name, info["metrics"],
                       f"at export{f' (step {step})' if step is not None else ''}, from bertfit.json"))
    for split, metrics in evaluations:
        splits.append((split, folder_name(metrics.get("data")) or data_name, metrics,
                       f"`python -m train.evaluate`, from eval-{split}/metrics.json"))

    front = {"library_name": "transformers", "pipeline_tag": "text-classification"}
    if base:
        front["base_model"] = base
    front["tags"] = ["bertfit", "text-classification", PROBLEM_TYPE_TAGS.get(problem_type, problem_type)]
    if problem_type != "regression":
        front["labels"] = labels
    results = [model_index_result(split, dataset, metrics) for split, dataset, metrics, _ in splits]
    results = [r for r in results if r["metrics"]]
    if results:
        front["model-index"] = [{"name": name, "results": results}]
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)

    sections = [
        f"# {name}\n\n"
        f"A {PROBLEM_TYPE_WORDS.get(problem_type, problem_type)} fine-tuned"
        f"{f' from `{base}`' if base else ''} with bertfit on the `{data_name}` data. Long documents are split "
        + ("into overlapping windows; the encoder reads every window and a document head pools the windows' "
           "first-token states into one vector that the classifier scores (see below)."
           if info.get("objective") == "document" else
           "into overlapping windows; the model scores every window and bertfit pools the windows' outputs into "
           "one prediction per document."),
        labels_section(problem_type, labels, info),
        data_section(info, config, data_name),
        pooling_section(problem_type, labels, info),
        metrics_section(splits),
        training_section(info, config, base),
        usage_section(problem_type, info),
    ]
    return f"---\n{header}---\n\n" + "\n\n".join(s.strip("\n") for s in sections) + "\n"


def model_index_result(split: str, dataset: str, metrics: dict) -> dict:
    """One model-index result in the Hub's format: the document-level metrics (what bertfit predicts) of one
    split, each named by its bertfit key. Non-finite values are left out (the Hub wants numbers)."""
    entries = []
    for key, value in numeric_metrics(metrics).items():
        if not key.startswith("doc_") or not math.isfinite(value):
            continue
        entry = {"type": hub_metric_type(key[len("doc_"):]), "value": value, "name": key}
        average = key.rsplit("_", 1)[-1]
        if entry["type"] in ("f1", "precision", "recall") and average in AVERAGES:
            entry["args"] = {"average": average}
        entries.append(entry)
    return {"task": {"type": "text-classification", "name": "Text Classification"},
            "dataset": {"name": dataset, "type": dataset, "split": split}, "metrics": entries}


def hub_metric_type(name: str) -> str:
    if name in HUB_METRIC_TYPES:
        return HUB_METRIC_TYPES[name]
    base = name.split("_", 1)[0]  # f1_macro, precision_<label>, ...
    return HUB_METRIC_TYPES[base] if base in ("f1", "precision", "recall") else name


def numeric_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def cell(value, digits: int | None = None) -> str:
    """A Markdown table cell, | escaped; floats to ``digits`` decimals if given (metrics), else as Python
    writes them (a learning rate of 5e-05 must not read 0.0001)."""
    if isinstance(value, float) and digits is not None:
        text = f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    elif isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def labels_section(problem_type: str, labels: list[str], info: dict) -> str:
    if problem_type == "regression":
        text = (f"## Output\n\nOne number per document (`config.json` names the output `{REGRESSION_OUTPUT}`), in "
                "the training targets' units.")
        target = info.get("target")
        if isinstance(target, dict) and target:
            text += " Training targets: " + ", ".join(f"{k} {cell(v, 4)}" for k, v in target.items()) + "."
        return text
    rows = "\n".join(f"| {i} | {cell(label)} |" for i, label in enumerate(labels))
    return f"## Labels\n\n| id | label |\n|---|---|\n{rows}"


def data_section(info: dict, config: dict, data_name: str) -> str:
    chunking = info.get("chunking") if isinstance(info.get("chunking"), dict) else {}
    lines = [f"- Data: `{data_name}` (a `python -m data_prep` output folder); training split "
             f"`{config.get('train_split', 'train')}`"]
    if info.get("task") == "pair":
        lines.append("- Inputs: text pairs (a text and a second text per document)")
    clean = info.get("clean") or []
    lines.append(f"- Cleaning before tokenizing: {', '.join(clean) if clean else 'none'}")
    for key, words in CHUNKING_WORDS.items():
        if chunking.get(key) is not None:
            lines.append(f"- `{key}`: {chunking[key]} ({words})")
    size, stride = chunking.get("chunk_size"), chunking.get("stride")
    if isinstance(size, int) and isinstance(stride, int):
        lines.append(f"- Overlap between windows: {max(size - stride, 0)} tokens")
    return "## Data and windows\n\n" + "\n".join(lines)


def pooling_section(problem_type: str, labels: list[str], info: dict) -> str:
    pooling = info.get("pooling")
    words = {"mean": "the mean of the windows' outputs", "max": "the maximum of the windows' outputs",
             "max_positive": "the window most confident in the positive class"}
    default = "the problem type's default" if pooling is None else None
    if info.get("objective") == "document":  # train/document.py
        lines = [f"- Trained with the document objective: the windows' first-token states are pooled by a "
                 f"`{info.get('doc_pooler')}` document pooler (weights in `document_head.safetensors`) and the "
                 "classifier reads the pooled vector; bertfit's predict, evaluate and Python API use it",
                 "- `transformers.pipeline` loads the encoder and classifier without the document pooler: it "
                 "classifies one window (the first) as if it were the whole document"]
    else:
        lines = [f"- Pooling of the windows into one document: `{pooling or 'default'}` "
                 f"({default or words.get(pooling, pooling)})"]
    if problem_type == "multi_label":
        thresholds = info.get("thresholds")
        if thresholds:
            lines.append("- A label is predicted when its probability is at least its threshold:")
            lines.append("\n| label | threshold |\n|---|---|\n" + "\n".join(
                f"| {cell(label)} | {cell(float(t))} |" for label, t in zip(labels, thresholds)))
        else:
            lines.append("- A label is predicted when its probability is at least 0.5 (no tuned thresholds)")
    elif problem_type == "single_label":
        lines.append("- The predicted label is the one with the highest pooled probability (softmax)")
    else:
        lines.append("- The output is the raw value (no activation)")
    return "## Pooling and thresholds\n\n" + "\n".join(lines)


def metrics_section(splits: list[tuple[str, str, dict, str]]) -> str:
    if not splits:
        return "## Metrics\n\nNo evaluated split: the model was trained without a validation split."
    parts = ["## Metrics\n\nDocument metrics score the pooled prediction per document; window metrics score every "
             "window on its own."]
    for split, dataset, metrics, source in splits:
        values = numeric_metrics(metrics)
        names = []
        for key in values:
            for prefix in ("doc_", "window_"):
                if key.startswith(prefix) and key[len(prefix):] not in names:
                    names.append(key[len(prefix):])
        counts = ", ".join(f"{int(values[k])} {word}" for k, word in (("num_docs", "documents"),
                                                                       ("num_windows", "windows")) if k in values)
        pooling = f"`{metrics['pooling']}` pooling" if isinstance(metrics.get("pooling"), str) else ""
        rows = "\n".join(f"| {cell(name)} | {cell(values.get('doc_' + name, ''), 4)} | "
                         f"{cell(values.get('window_' + name, ''), 4)} |" for name in names)
        detail = f" ({', '.join(part for part in (counts, pooling) if part)})" if counts or pooling else ""
        parts.append(f"### {split}\n\n`{dataset}` split `{split}`{detail}; {source}.\n\n"
                     f"| metric | document | window |\n|---|---|---|\n{rows}")
    return "\n\n".join(parts)


def training_section(info: dict, config: dict, base: str | None) -> str:
    rows = [("base model", base)] if base else []
    for key in CARD_CONFIG_FIELDS:
        value = config.get(key)
        if isinstance(value, dict):  # early_stopping: its set fields, one row each
            rows += [(f"{key}.{k}", v) for k, v in value.items() if v is not None]
        elif value is not None:
            rows.append((key, value))
    if info.get("step") is not None:
        rows.append(("exported at step", info["step"]))
    table = "\n".join(f"| `{cell(k)}` | {cell(v)} |" for k, v in rows)
    return ("## Training\n\n| setting | value |\n|---|---|\n" + table +
            "\n\nThe full training config is in `train_config.yaml`; bertfit.json records the window settings, "
            "pooling, labels and metrics that prediction uses.")


def usage_section(problem_type: str, info: dict) -> str:
    chunking = info.get("chunking") if isinstance(info.get("chunking"), dict) else {}
    max_length = chunking.get("max_length", 512)
    pair = info.get("task") == "pair"
    example = '{"text": "first text", "text_pair": "second text"}' if pair else '"A text to classify."'
    api_call = 'clf(["first text"], ["second text"])' if pair else 'clf(["A text to classify."])'
    api_fields = {"single_label": ".label, .probabilities", "regression": ".value",
                  "multi_label": ".labels (thresholds applied), .probabilities"}.get(problem_type, "")
    api_call += f"  # per document: {api_fields}, .windows"
    # The function config.json's problem_type makes pipeline apply, spelled out so the snippet says what it does.
    if problem_type == "multi_label":
        function, comment = "sigmoid", "every label with its probability; predict those >= their threshold above"
    elif problem_type == "regression":
        function, comment = "none", f'[{{"label": "{REGRESSION_OUTPUT}", "score": <the raw value>}}]'
    else:
        function, comment = "softmax", "every label with its probability, highest first"
    top_k = "" if problem_type == "regression" else " top_k=None,"  # regression: one {label, score} per text
    return f"""## How to use

### bertfit (documents of any length)

bertfit windows, cleans and pools exactly as in training (the settings above, from bertfit.json):

```python
from bertfit import DocumentClassifier

clf = DocumentClassifier.from_pretrained("{PLACEHOLDER_PATH}")
{api_call}
```

or from the command line:

```bash
python -m train.predict --model {PLACEHOLDER_PATH} --input texts.csv --output predictions.csv
```

### transformers.pipeline (first window only)

> **Caveat:** plain `pipeline()` sees only the first window: it truncates every text at {max_length} tokens
> (`max_length`), with no windows and no pooling, so its predictions for longer documents differ from
> bertfit's. Use the bertfit API or `python -m train.predict` for long documents.

```python
from transformers import pipeline

clf = pipeline("text-classification", model="{PLACEHOLDER_PATH}", function_to_apply="{function}",{top_k}
               truncation=True, max_length={max_length})
clf([{example}])  # per text: {comment}
```"""
