"""The training loop, top to bottom. Run it with

    accelerate launch --config_file accelerate_configs/cpu.yaml -m train --config train/configs/tiny_smoke.yaml

setup -> model and data -> resume -> for each epoch, for each optimizer step: accumulate micro-batches, clip,
step, log; evaluate, export the best model, early-stop, checkpoint, honour SIGUSR1/SIGTERM -> finish.
Each helper it calls does one named thing (train/config.py, data.py, optim.py, evaluation.py, checkpoint.py,
export.py, distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import DataPrepError
from data_prep.prepare import read_manifest
from data_prep.tokenizer import load_fast_tokenizer, resolve_pretrained_path, tokenizer_fingerprint
from train import run_lock, signals
from train.checkpoint import (LoopState, latest_usable_checkpoint, load_checkpoint, remove_partial_checkpoints,
                              save_checkpoint, verify_checkpoint)
from train.config import (EXIT_CONFIG_ERROR, EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, ConfigError, TrainConfig,
                          flat_hparams, parse_config, to_dict, tracker_init_kwargs)
from train.data import (EpochPlan, WindowBatches, check_split_contract, document_epoch_batches, document_windows,
                        epoch_batches, eval_batches, label_array, load_split, make_loader, model_inputs)
from train.document import attach_document_head
from train.distributed import (configure_deepspeed, is_deepspeed, make_accelerator, single_process_zero_hint,
                               zero_stage)
from train.evaluation import confusion_matrix_image, rescore, run_evaluation, tune_thresholds
from train.export import HF_PROBLEM_TYPES, export_model
from train.losses import loss_unit_labels, make_loss, problem_type_of, target_scale
from train.optim import lr_at_step, make_optimizer, set_lr, warmup_steps_for
from train.speedups import SpeedupsError, apply_speedups
from train.throughput import mfu, model_flops_per_token
from train.versions import version_problem


def train(cfg: TrainConfig) -> int:
    # ---------------------------------------------------------------------------------------------- setup
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    print(f"bertfit: rank {rank} of world size {world} on {os.uname().nodename} "
          f"(device {accelerator.device}, {accelerator.distributed_type.value}, "
          f"mixed precision {accelerator.mixed_precision})", flush=True)
    if main and (hint := single_process_zero_hint(accelerator)):
        print(hint, flush=True)
    # One run per output_dir: the main process locks it for the run's life; every rank learns the outcome, so
    # a refused launch exits on all ranks at once (and writes nothing into the other run's folder).
    lock_error = broadcast_from_main(accelerator, run_lock.acquire_run_lock(out) if main else None)
    if lock_error:
        raise ConfigError(lock_error)
    if cfg.on_nonfinite == "skip_step" and is_deepspeed(accelerator):
        raise ConfigError("on_nonfinite: skip_step is not possible under DeepSpeed (its engine steps inside "
                          "backward); use on_nonfinite: stop")

    try:
        manifest = read_manifest(cfg.data)
    except DataPrepError as exc:
        raise ConfigError(f"data: {exc}") from None
    label_names, problem_type = manifest["labels"], problem_type_of(manifest)
    model_path = resolve_pretrained_path(cfg.model, option="model")
    tokenizer = load_fast_tokenizer(model_path, option="model")
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise ConfigError(f"model {cfg.model}: its tokenizer differs from the one {cfg.data} was prepared with "
                          f"({manifest['tokenizer']['name_or_path']}); re-run data_prep with --tokenizer {cfg.model}")
    resolve_task_settings(cfg, problem_type, label_names)
    if finished := finished_run(cfg, out):
        if main:
            print(finished, flush=True)
        return EXIT_OK

    train_ds = load_split(cfg.data, cfg.train_split, manifest)
    eval_ds = load_split(cfg.data, cfg.eval_split, manifest) if cfg.eval_split else None
    train_lengths = np.asarray(train_ds["length"])
    if cfg.max_tokens_per_batch is not None and len(train_lengths) and cfg.max_tokens_per_batch < train_lengths.max():
        raise ConfigError(f"max_tokens_per_batch {cfg.max_tokens_per_batch} is smaller than the longest training "
                          f"window ({train_lengths.max()} tokens); raise it or set it to null")
    # the document objective's units: each document's windows in reading order
    train_docs = None
    if cfg.objective == "document":
        doc_ids = np.asarray(train_ds["doc_id"])  # read once: the column can be large
        train_docs = document_windows(doc_ids, np.asarray(train_ds["chunk_index"]))
        if cfg.train_windows_per_doc is None:
            cfg.train_windows_per_doc = windows_one_batch_holds(cfg, train_lengths)
            sampled = sum(len(w) > cfg.train_windows_per_doc for w in train_docs)
            if main and sampled:
                print(f"bertfit: objective: document: {sampled} of {len(train_docs)} documents have more windows "
                      f"than one micro-batch holds; each trains on a fresh sample of {cfg.train_windows_per_doc} "
                      "of its windows per epoch (train_windows_per_doc); evaluation reads every window", flush=True)
        check_documents_fit(cfg, train_docs, train_lengths, doc_ids)
    total_steps, epochs = schedule_length(cfg, train_lengths, train_docs, world)
    warmup = warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio)

    # ---------------------------------------------------------------------------------- model & optimizer
    accelerator.wait_for_everyone()
    torch.manual_seed(cfg.seed)  # same classifier-head init on every rank
    model = load_model(model_path, label_names, problem_type, cfg.trust_remote_code, manifest["chunking"]["max_length"])
    if cfg.objective == "document":
        try:
            attach_document_head(model, cfg.doc_pooler)  # pooler + document forward (train/document.py)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    vocab = model.get_input_embeddings().num_embeddings
    type_vocab = getattr(model.config, "type_vocab_size", None)
    for split, ds in ((cfg.train_split, train_ds), (cfg.eval_split, eval_ds)):
        if ds is not None:  # fail now, not with an index error some steps into training
            check_split_contract(cfg.data, split, ds, manifest, vocab, type_vocab, cfg.verify_data)
    scale = target_scale(manifest, cfg.train_split, cfg.standardize_targets)  # regression: (mean, std) or None
    weighted = cfg.class_weights is not None or cfg.pos_weight is not None
    loss_fn = make_loss(problem_type, label_names, loss_unit_labels(label_array(train_ds), train_docs) if weighted
                        else None, cfg.class_weights, cfg.pos_weight, scale)
    try:  # every speed switch, in one place (train/speedups.py)
        speed = apply_speedups(model, cfg.speedups, accelerator.device, mixed_precision=accelerator.mixed_precision,
                               zero_stage=zero_stage(accelerator))
    except SpeedupsError as exc:
        raise ConfigError(str(exc)) from None
    if main:
        print("\n".join([*speed.notices, speed.summary()]), flush=True)
    optimizer = make_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_windows = WindowBatches(train_ds, tokenizer.pad_token_id, **speed.batch_layout(),
                                  documents=train_docs is not None)
    eval_windows = None if eval_ds is None else WindowBatches(eval_ds, tokenizer.pad_token_id, **speed.batch_layout())
    eval_bs = cfg.eval_batch_size or 2 * cfg.per_device_batch_size

    # ------------------------------------------------------------------------------------------- resume
    state = LoopState(world_size=world, seed=cfg.seed)
    # The main process verifies (checksums: one read of the checkpoint) and every rank resumes from its choice.
    resume_from, resume_error = broadcast_from_main(accelerator, pick_resume(cfg, out) if main else (None, None))
    if resume_error:
        raise ConfigError(resume_error)
    if main:
        removed = remove_partial_checkpoints(out)
        if removed:
            print(f"bertfit: removed incomplete checkpoint(s) from a killed save: {', '.join(removed)}", flush=True)
    accelerator.wait_for_everyone()
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        if main and state.world_size != world:
            print(f"bertfit: checkpoint was written by {state.world_size} processes, now {world}: the batch "
                  "order after the resume point differs from an uninterrupted run", flush=True)
        if main:
            print(f"bertfit: resumed from {resume_from} (epoch {state.epoch}, step {state.global_step})", flush=True)
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout streams differ per rank, fixed per seed
    if main:
        out.mkdir(parents=True, exist_ok=True)
        trim_history(out, state.global_step)
        write_status(out, "running", state.global_step, world=world)
    hparams = flat_hparams(cfg)
    accelerator.init_trackers(cfg.tracker_project, init_kwargs=tracker_init_kwargs(cfg))
    for tracker in accelerator.trackers:  # TensorBoard gets them at the end, with the best model's metrics
        if tracker.name != "tensorboard":
            tracker.store_init_configuration(hparams)

    flops_per_token = None
    info = {"labels": label_names, "chunking": manifest["chunking"], "task": manifest.get("task", "single"),
            "problem_type": problem_type, "pooling": cfg.pooling, "thresholds": None, "objective": cfg.objective,
            "doc_pooler": cfg.doc_pooler if cfg.objective == "document" else None,
            "clean": manifest.get("clean", []), "target": manifest["splits"][cfg.train_split].get("target"),
            "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"],
            "data": str(Path(cfg.data).resolve()), "config": to_dict(cfg)}
    progress = make_progress(total_steps, state.global_step, main)
    stop_reason = None
    tracker = StepMeter(accelerator)
    # fp16's loss scaler skips steps with inf gradients by design; DeepSpeed reports no usable norm per step.
    watch_grad_norm = accelerator.mixed_precision != "fp16" and not is_deepspeed(accelerator)
    nonfinite = NonFiniteWatch(accelerator)
    skip_nonfinite = cfg.on_nonfinite == "skip_step" and watch_grad_norm
    skipped = 0

    # ----------------------------------------------------------------------------------------- the loop
    while state.epoch < epochs and state.global_step < total_steps and stop_reason is None:
        plan = epoch_plan(cfg, train_lengths, train_docs, world, rank, state.epoch)
        gas = cfg.gradient_accumulation_steps
        todo = plan.micro_batches[state.step_in_epoch * gas:]  # mid-epoch resume: skip the steps already taken
        loss_scales = iter(plan.loss_scale[state.step_in_epoch * gas:] if plan.loss_scale else [])
        loader = iter(make_loader(train_windows, todo, cfg.num_workers, pin_memory=accelerator.device.type == "cuda"))
        model.train()
        for _ in range(plan.steps - state.step_in_epoch):
            lr = lr_at_step(state.global_step + 1, total_steps, warmup, cfg.learning_rate)
            set_lr(optimizer, lr)
            skip_step = False
            for _micro in range(gas):
                batch = next(loader)
                with accelerator.accumulate(model):
                    logits = model(**model_inputs(batch, accelerator.device)).logits
                    loss = loss_fn(logits, batch["labels"].to(accelerator.device, non_blocking=True))
                    accelerator.backward(loss * next(loss_scales, 1.0))  # equal weight per window/document
                    if accelerator.sync_gradients:
                        grad_norm = clip_or_measure(accelerator, model, cfg.max_grad_norm)
                        if skip_nonfinite:  # the norm is of the all-reduced gradients: every rank agrees
                            skip_step = not math.isfinite(float(grad_norm))
                        elif watch_grad_norm:
                            nonfinite.add(grad_norm)
                    if not skip_step:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if not skip_nonfinite:
                    nonfinite.add(loss.detach())
                tracker.add(loss.detach(), len(batch["labels"]), len(batch["real_lengths"]), batch["real_tokens"],
                            batch["padded_tokens"])
            if skip_step:
                skipped += 1
                if main:
                    print(f"bertfit: step {state.global_step + 1}: non-finite gradient norm; step skipped "
                          f"(on_nonfinite: skip_step; {skipped} in this launch)", flush=True)
            state.global_step += 1
            state.step_in_epoch += 1
            progress.update(1)

            if state.global_step % cfg.log_every_steps == 0 or state.global_step == total_steps:
                logs = tracker.flush(lr, grad_norm)
                if cfg.peak_tflops:
                    flops_per_token = flops_per_token or model_flops_per_token(
                        accelerator.unwrap_model(model).config, logs.pop("_mean_padded_len"))
                    if flops_per_token:
                        logs["train/mfu"] = mfu(logs["train/tokens_per_s"], flops_per_token, cfg.peak_tflops, world)
                logs.pop("_mean_padded_len", None)
                accelerator.log(logs, step=state.global_step)
                if main:
                    append_history(out, {"step": state.global_step, "epoch": state.epoch, **logs})
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                nonfinite.check(state.global_step)

            last_of_epoch = state.step_in_epoch == plan.steps
            done = state.global_step >= total_steps
            if eval_windows is not None and (last_of_epoch or done or (
                    cfg.eval_every_steps and state.global_step % cfg.eval_every_steps == 0)):
                nonfinite.check(state.global_step)  # never evaluate, let alone export, a diverged model
                if evaluate_and_select(accelerator, cfg, model, tokenizer, eval_windows, eval_bs, label_names,
                                       problem_type, scale, state, info, out):
                    stop_reason = "early_stopped"
                tracker.restart_clock()
            requeue = stop_signal_received(accelerator)
            if last_of_epoch:
                state.epoch += 1
                state.step_in_epoch = 0
            if (last_of_epoch or done or requeue or stop_reason
                    or (cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0)):
                nonfinite.check(state.global_step)  # a checkpoint is something to resume from: finite only
                with write_errors_as_one_line(f"checkpoint in {out / 'checkpoints'}"):
                    path = save_checkpoint(accelerator, out, state, cfg.keep_last)
                tracker.restart_clock()
                if requeue:
                    return requeue_exit(accelerator, out, state, path)
            if stop_reason or done or last_of_epoch:
                break

    # ------------------------------------------------------------------------------------------- finish
    if eval_windows is None:  # nothing to select on: the final model is the export
        nonfinite.check(state.global_step)
        with write_errors_as_one_line(f"export to {out / 'best'}"):
            export_model(accelerator, model, tokenizer, out / "best",
                         {**info, "step": state.global_step, "metrics": {}}, output_scale=scale)
    progress.close()
    if main and (shapes := speed.compiled_shapes()):
        print(shapes, flush=True)
    if main:
        log_best_metrics(accelerator, out, hparams, state.global_step)
    accelerator.end_training()
    print(f"bertfit: rank {rank} finished at step {state.global_step} ({stop_reason or 'completed'})", flush=True)
    if main:
        write_status(out, stop_reason or "completed", state.global_step, world=world,
                     best_metric=state.best_metric, best_step=state.best_step, export=str(out / "best"))
        print(f"bertfit: {stop_reason or 'completed'} at step {state.global_step}; best "
              f"{cfg.early_stopping.metric}={state.best_metric} at step {state.best_step}; model: {out / 'best'}",
              flush=True)
        run_lock.release_run_lock(out)
    return EXIT_OK


# ------------------------------------------------------------------------------------------ loop helpers
def epoch_plan(cfg: TrainConfig, lengths: np.ndarray, docs: list | None, world: int, rank: int,
               epoch: int) -> EpochPlan:
    """This rank's micro-batches of an epoch: windows, or whole documents (objective: document)."""
    if docs is not None:
        return document_epoch_batches(docs, lengths, cfg.per_device_batch_size, world, rank, cfg.seed, epoch,
                                      cfg.gradient_accumulation_steps, cfg.length_grouping,
                                      cfg.max_tokens_per_batch, cfg.train_windows_per_doc)
    return epoch_batches(lengths, cfg.per_device_batch_size, world, rank, cfg.seed, epoch,
                         cfg.gradient_accumulation_steps, cfg.length_grouping, cfg.max_tokens_per_batch)


def windows_one_batch_holds(cfg: TrainConfig, lengths: np.ndarray) -> int:
    """objective: document with train_windows_per_doc null: the largest sample every document's windows can
    be cut to and still fit one micro-batch (per_device_batch_size windows, or max_tokens_per_batch tokens of
    the split's longest window), so a long document trains on a sample instead of stopping the run."""
    if cfg.max_tokens_per_batch is None:
        return cfg.per_device_batch_size
    return max(1, cfg.max_tokens_per_batch // max(1, int(lengths.max(initial=0))))


def check_documents_fit(cfg: TrainConfig, docs: list, lengths: np.ndarray, doc_ids: np.ndarray) -> None:
    """objective: document: a micro-batch holds whole documents, so one document (its train_windows_per_doc
    sample) must fit the batch limit; otherwise it would be a micro-batch of its own far over the limit (an
    out-of-memory hours into a run). Refuse now, naming the largest document and the cap that would fit.
    train_windows_per_doc is set by now (the loop resolves null through windows_one_batch_holds)."""
    cap = cfg.train_windows_per_doc
    worst, worst_size = None, 0
    for windows in docs:
        n = min(len(windows), cap)
        size = n * int(lengths[windows].max()) if cfg.max_tokens_per_batch is not None else n
        if size > worst_size:
            worst, worst_size = windows, size
    if worst is None:
        return
    if cfg.max_tokens_per_batch is not None and worst_size > cfg.max_tokens_per_batch:
        limit = f"max_tokens_per_batch {cfg.max_tokens_per_batch}"
    elif cfg.max_tokens_per_batch is None and worst_size > cfg.per_device_batch_size:
        limit = f"per_device_batch_size {cfg.per_device_batch_size}"
    else:
        return
    fit = windows_one_batch_holds(cfg, lengths[worst])
    n = min(len(worst), cap)
    raise ConfigError(f"objective: document: document '{doc_ids[worst[0]]}' of split {cfg.train_split!r} "
                      f"trains {n} windows of up to {int(lengths[worst].max())} tokens at once, more than "
                      f"{limit} holds in one micro-batch (a document is never split); set "
                      f"train_windows_per_doc: {fit} (or lower) to train on a sample of each document's "
                      "windows, or raise the limit")


def schedule_length(cfg: TrainConfig, lengths: np.ndarray, docs: list | None, world: int) -> tuple[int, int]:
    """(total optimizer steps, epochs): the steps of ``epochs`` epochs (with a token budget or documents they
    vary a little between epochs), or max_steps (which overrides epochs) and as many epochs as it takes."""
    def steps_of(epoch: int) -> int:
        steps = epoch_plan(cfg, lengths, docs, world, 0, epoch).steps
        if steps == 0:  # the loop could not make progress in this epoch: refuse now, not hang later
            units = f"{len(lengths)} windows" if docs is None else f"{len(docs)} documents"
            raise ConfigError(f"split {cfg.train_split!r}: epoch {epoch} would have no optimizer step ({units} make "
                              f"fewer micro-batches than gradient_accumulation_steps x {world} processes); lower "
                              "per_device_batch_size, max_tokens_per_batch or gradient_accumulation_steps")
        return steps

    if cfg.max_steps is None:
        return sum(steps_of(e) for e in range(cfg.epochs)), cfg.epochs
    total, epochs = 0, 0
    while total < cfg.max_steps:
        total += steps_of(epochs)
        epochs += 1
    return cfg.max_steps, epochs


def load_model(model_path: str, label_names: list[str], problem_type: str, trust_remote_code: bool,
               max_length: int):
    from transformers import AutoModelForSequenceClassification

    names = label_names or ["value"]  # regression: one output
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, problem_type=HF_PROBLEM_TYPES[problem_type],
            trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True)
    except Exception as exc:
        raise ConfigError(f"model {model_path}: cannot load: {str(exc).splitlines()[0]}") from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and positions < max_length:
        raise ConfigError(f"model {model_path}: {positions} positions, but the shards hold windows of up to "
                          f"{max_length} tokens; re-run data_prep with --max-length {positions}")
    return model


def broadcast_from_main(accelerator, value):
    """The main process's value on every rank (any picklable object)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


# What a failed write looks like from the libraries a save goes through (safetensors' Rust errors, torch.save's
# RuntimeError): these become one error line; anything else is a bug and keeps its traceback.
_WRITE_FAILURE = re.compile(r"os error \d+|No space left|Read-only file system|Permission denied|quota|"
                            r"file write failed|failed writing", re.IGNORECASE)


@contextlib.contextmanager
def write_errors_as_one_line(what: str):
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        if not _WRITE_FAILURE.search(str(exc)):
            raise
        raise OSError(f"{what}: cannot write ({str(exc).strip().splitlines()[0]})") from None


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm under on_nonfinite: stop."""


class NonFiniteWatch:
    """Counts non-finite losses and gradient norms on the device and reads the count (one host sync, reduced over
    ranks so all stop together) only where something is about to be logged, evaluated, saved or exported: a
    clean run pays nothing extra per step, and nothing non-finite is ever written."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.count = torch.zeros((), dtype=torch.int64, device=accelerator.device)

    def add(self, value) -> None:
        if value is None:  # DeepSpeed may report no norm
            return
        value = value if torch.is_tensor(value) else torch.tensor(float(value))
        self.count += (~torch.isfinite(value.float())).sum().to(self.count.device)

    def check(self, step: int) -> None:
        count = self.count
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count.clone(), reduction="sum")
        if count.item():
            raise TrainingDiverged(
                f"non-finite loss or gradient norm at or before step {step}; stopped (on_nonfinite: stop). The "
                "checkpoints and best model from before it are kept. Lower learning_rate, set max_grad_norm, "
                "check the data, or set on_nonfinite: skip_step")


def resolve_task_settings(cfg: TrainConfig, problem_type: str, label_names: list[str]) -> None:
    """Fill the settings whose defaults depend on the problem type (pooling, the early-stopping metric and its
    mode) and refuse the ones that contradict it; the resolved values are what the export's config records."""
    from train.evaluation import check_pooling, default_pooling
    from train.metrics import metric_mode, metric_names

    es = cfg.early_stopping
    es.metric = es.metric or {"single_label": "doc_accuracy", "multi_label": "doc_f1_micro",
                              "regression": "doc_mse"}[problem_type]
    names = metric_names(label_names, problem_type)
    valid = [f"{level}_{n}" for level in ("doc", "window") for n in dict.fromkeys(["loss", *names])]
    if es.metric not in valid:
        raise ConfigError(f"early_stopping.metric {es.metric!r} is not computed for {problem_type} data; choose "
                          f"from {', '.join(valid)}")
    mode = metric_mode(es.metric)
    if es.mode is not None and es.mode != mode:
        raise ConfigError(f"early_stopping.mode {es.mode} contradicts early_stopping.metric {es.metric} "
                          f"({'lower' if mode == 'min' else 'higher'} is better); set mode: {mode} or leave it out")
    es.mode = mode
    if es.patience is not None and not cfg.eval_split:
        raise ConfigError("early_stopping.patience needs an eval_split")
    cfg.pooling = cfg.pooling or default_pooling(problem_type)
    try:
        check_pooling(problem_type, cfg.pooling, len(label_names))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.class_weights is not None and problem_type != "single_label":
        raise ConfigError(f"class_weights is for single-label data; this data is {problem_type}"
                          + (" (use pos_weight)" if problem_type == "multi_label" else ""))
    if cfg.pos_weight is not None and problem_type != "multi_label":
        raise ConfigError(f"pos_weight is for multi-label data; this data is {problem_type}"
                          + (" (use class_weights)" if problem_type == "single_label" else ""))
    for option in ("class_weights", "pos_weight"):
        weights = getattr(cfg, option)
        if isinstance(weights, dict) and (unknown := sorted(set(weights) - set(label_names))):
            raise ConfigError(f"{option}: unknown label(s) {', '.join(map(repr, unknown))}; the labels are "
                              f"{', '.join(label_names)}")
    if cfg.threshold == "tune":
        if problem_type != "multi_label":
            raise ConfigError(f"threshold: tune is for multi-label data; this data is {problem_type}")
        if not cfg.eval_split:
            raise ConfigError("threshold: tune needs an eval_split to pick the thresholds on")


def finished_run(cfg: TrainConfig, out: Path) -> str | None:
    """A relaunch of a run that already completed or early-stopped must not train on past its end (and overwrite
    best/): say so instead. A new run needs a new output_dir, or resume: none."""
    status_file = out / "run_status.json"
    if cfg.resume.strip() != "auto" or not status_file.is_file():
        return None
    try:
        status = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return None
    if status.get("state") not in ("completed", "early_stopped"):
        return None
    return (f"bertfit: the run in {out} already finished ({status['state']} at step {status.get('step')}); nothing "
            f"to do. Its model: {out / 'best'}. To train again use a new output_dir, or resume: none")


def pick_resume(cfg: TrainConfig, out: Path) -> tuple[Path | None, str | None]:
    """(checkpoint to resume from or None, or a one-line reason the run cannot start). resume: auto takes the
    newest checkpoint that verifies, and says which damaged ones it passed over (it deletes none of them)."""
    choice = cfg.resume.strip()
    if choice == "none":
        return None, None
    if choice == "auto":
        path, notices = latest_usable_checkpoint(out)
        for notice in notices:
            print(notice, flush=True)
        if path is None and notices:
            return None, (f"output_dir {out}: no checkpoint verifies (see above); move the damaged ones away to "
                          "start afresh, or set resume: none")
        return path, None
    reason = verify_checkpoint(choice)
    if reason:
        return None, f"resume {choice}: not a usable bertfit checkpoint ({reason})"
    return Path(choice), None


def clip_or_measure(accelerator, model, max_grad_norm: float | None):
    """Clip to max_grad_norm and return the pre-clip global norm (a tensor; no host sync here).
    Under DeepSpeed the engine clips (gradient_clipping) and reports the norm itself."""
    if is_deepspeed(accelerator):
        return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or 0.0)
    return accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))


class StepMeter:
    """Sums loss and token counts between log steps; one all-reduce per log step, not per micro-batch."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.loss = torch.zeros((), device=accelerator.device)
        self.micro = self.samples = self.windows = self.real = self.padded = 0
        self.start = time.perf_counter()

    def add(self, loss, samples: int, windows: int, real_tokens: int, padded_tokens: int) -> None:
        """samples: what the loss counts (windows, or documents under the document objective)."""
        self.loss += loss.float()
        self.micro += 1
        self.samples += samples
        self.windows += windows
        self.real += real_tokens
        self.padded += padded_tokens

    def restart_clock(self) -> None:  # evaluation and checkpoint time is not training throughput
        self.start = time.perf_counter()

    def flush(self, lr: float, grad_norm) -> dict:
        a = self.accelerator
        counts = torch.tensor([self.micro, self.samples, self.windows, self.real, self.padded], dtype=torch.float64)
        sums = torch.cat([self.loss.double().reshape(1), counts.to(a.device)])
        if a.num_processes > 1:
            sums = a.reduce(sums, reduction="sum")
        loss_sum, micro, samples, windows, real, padded = sums.tolist()  # the one host sync per log step
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        logs = {"train/loss": loss_sum / max(micro, 1), "train/lr": lr, "train/grad_norm": norm,
                "train/tokens_per_s": real / elapsed, "train/samples_per_s": samples / elapsed,
                "train/padding_fraction": 1.0 - real / max(padded, 1),
                "_mean_padded_len": padded / max(windows, 1)}  # the attention term of the MFU: per window
        self.loss.zero_()
        self.micro = self.samples = self.windows = self.real = self.padded = 0
        self.start = time.perf_counter()
        return logs


def evaluate_and_select(accelerator, cfg, model, tokenizer, eval_windows, eval_bs, label_names, problem_type, scale,
                        state, info, out) -> bool:
    """Evaluate, log, export on improvement; returns True when early stopping says stop (same on all ranks)."""
    lengths = np.asarray(eval_windows.ds["length"])
    batches, real = eval_batches(lengths, eval_bs, accelerator.num_processes, accelerator.process_index)
    loader = make_loader(eval_windows, batches, cfg.num_workers, pin_memory=False)
    fixed = [cfg.threshold] * len(label_names) if problem_type == "multi_label" and cfg.threshold != "tune" else None
    metrics, extras = run_evaluation(accelerator, model, loader, label_names, problem_type, cfg.pooling, len(lengths),
                                     thresholds=fixed, output_scale=scale, real_batches=real)
    thresholds = fixed
    if cfg.threshold == "tune":  # per label, the best-F1 threshold on these documents; the export keeps them
        thresholds = tune_thresholds(extras["doc_outputs"], extras["doc_labels"])
        metrics, extras = rescore(extras, problem_type, label_names, cfg.pooling, thresholds)
    if os.environ.get("BERTFIT_PRINT_RANK_METRICS") == "1":  # tests: prove every rank computed the same metrics
        # one write per line: print() may write text and newline separately, and both ranks share one pipe
        sys.stdout.write(f"bertfit: rank {accelerator.process_index} eval metrics at step {state.global_step}: "
                         f"{json.dumps(metrics, sort_keys=True)}\n")
        sys.stdout.flush()
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.global_step)
    es = cfg.early_stopping
    value = metrics[es.metric]
    # A NaN metric (a model whose outputs are not finite) never becomes the best model.
    improved = math.isfinite(value) and math.isfinite(metrics["doc_loss"]) and (state.best_metric is None or (
        value > state.best_metric + es.min_delta if es.mode == "max" else value < state.best_metric - es.min_delta))
    # Decide once, on the main process, and share it: every rank must take the same branch below.
    decision = torch.tensor([float(improved)], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        decision = broadcast(decision, from_process=0)
    improved = bool(decision.item())
    if improved:
        state.best_metric, state.best_step, state.bad_evals = value, state.global_step, 0
        with write_errors_as_one_line(f"export to {out / 'best'}"):
            export_model(accelerator, model, tokenizer, out / "best",
                         {**info, "step": state.global_step, "metrics": metrics, "thresholds": thresholds},
                         output_scale=scale)
    else:
        state.bad_evals += 1
    if accelerator.is_main_process:
        append_history(out, {"step": state.global_step, "epoch": state.epoch, "eval": metrics,
                             "best": improved})
        matrix = extras.get("confusion")
        for tracker in accelerator.trackers if matrix is not None else ():
            if hasattr(tracker, "log_images"):
                try:
                    tracker.log_images({"eval/confusion_matrix": confusion_matrix_image(matrix, label_names)[None]},
                                       step=state.global_step, dataformats="NHWC")
                except Exception as exc:  # an image is a nicety; never let it stop training
                    print(f"bertfit: could not log the confusion matrix to {tracker.name}: {exc}", flush=True)
        shown = dict.fromkeys([es.metric, "doc_accuracy", "window_accuracy", "doc_f1_micro", "doc_mse",
                               "doc_pearson", "doc_loss"])
        print(f"bertfit: eval at step {state.global_step}: {es.metric}={value:.4f}{' (best)' if improved else ''}; "
              + " ".join(f"{k}={metrics[k]:.4f}" for k in shown if k in metrics and k != es.metric), flush=True)
    return es.patience is not None and state.bad_evals >= es.patience


def log_best_metrics(accelerator, out: Path, hparams: dict, step: int) -> None:
    """The exported model's metrics as best/<name>, and in TensorBoard together with the hyperparameters: what
    TensorBoard's HParams view, W&B's summary and MLflow compare runs by."""
    try:
        metrics = json.loads((out / "best" / "bertfit.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        return
    best = {f"best/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}
    if not best:
        return
    accelerator.log(best, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # run_name ".": the same folder as the run's scalars
            tracker.writer.add_hparams(hparams, best, run_name=".", global_step=step)
            tracker.writer.flush()


def stop_signal_received(accelerator) -> bool:
    """True on every rank if any rank got SIGUSR1/SIGTERM (so all checkpoint at the same step)."""
    if accelerator.num_processes == 1:  # nothing to agree on: no device tensor, no host sync per step
        return signals.stop_requested()
    flag = torch.tensor([1.0 if signals.stop_requested() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="max").item())


def requeue_exit(accelerator, out: Path, state: LoopState, path: Path) -> int:
    accelerator.end_training()
    if accelerator.is_main_process:
        write_status(out, "requeue", state.global_step, checkpoint=str(path),
                     signal=signals.requested_signal_name())
        print(f"bertfit: {signals.requested_signal_name() or 'stop signal'} received: checkpoint {path} written; "
              f"exiting with {EXIT_REQUEUE} (relaunch with resume: auto to continue)", flush=True)
    return EXIT_REQUEUE


def make_progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # In a batch log (no terminal) redraw rarely instead of flooding the file with carriage returns.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=interval)


def write_status(out: Path, state: str, step: int, **extra) -> None:
    """output_dir/run_status.json: what the last run did (the SLURM scripts read it to decide on requeue)."""
    data = {"state": state, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    tmp = out / ".run_status.json.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out / "run_status.json")


def history_path(out: Path) -> Path:
    return out / "logs" / "history.jsonl"


def append_history(out: Path, record: dict) -> None:
    path = history_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def trim_history(out: Path, step: int) -> None:
    """On resume, drop records of steps after the checkpoint: they are about to be redone."""
    path = history_path(out)
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def main(argv: list[str] | None = None) -> int:
    # First thing: a SIGUSR1/SIGTERM during the (long) setup must not kill the process before it can checkpoint;
    # the flag is checked at the first step boundary.
    signals.install_stop_handlers()
    run_lock.die_with_launcher()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    output_dir = None
    try:
        if problem := version_problem():
            raise ConfigError(problem)
        cfg = parse_config(argv)
        output_dir = cfg.output_dir
        return train(cfg)
    except (ConfigError, DataPrepError) as exc:
        return fail(str(exc), output_dir or getattr(exc, "output_dir", None), EXIT_CONFIG_ERROR)
    except TrainingDiverged as exc:
        return fail(str(exc), output_dir, EXIT_NONFINITE)
    except OSError as exc:  # a full disk, a folder made read-only or removed under the run, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(f"{where}{exc.strerror or exc}", output_dir, EXIT_CONFIG_ERROR)


def fail(message: str, output_dir: str | None, code: int) -> int:
    """One error line (once, from rank 0: every rank fails the same way) and a "failed" run status, so a batch
    script never acts on an older one; but never into a folder another live run holds."""
    if os.environ.get("RANK", "0") == "0":
        from tqdm.auto import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # end a progress line first: the error gets its own
            bar.close()
        print(f"error: {message}", file=sys.stderr, flush=True)
        if output_dir and Path(output_dir).is_dir() and run_lock.lock_is_free_or_ours(output_dir):
            try:
                write_status(Path(output_dir), "failed", 0, error=message)
            except OSError:
                pass
    return code
