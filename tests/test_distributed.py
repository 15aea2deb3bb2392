"""The distributed matrix on CPU: the tiny random BERT in 2 processes under DDP, ZeRO-1, ZeRO-2 with gradient
accumulation 2, ZeRO-3, ZeRO-3 with CPU offload, ZeRO-3 in bf16, and two "machines" on 127.0.0.1 (DDP in bf16,
ZeRO-3), each launched with the shipped accelerate config.

Every case is two launches of the real trainer with the shipped accelerate configs:
  A  an uninterrupted 8-step run (checkpoint at step 4, evaluation at steps 4 and 8, best-model export);
  B  a fresh launch that resumes from A's step-4 checkpoint and trains steps 5-8.
and asserts, for both launches:
  - world size 2 with ranks 0 and 1 (several launch forms silently run one process);
  - every rank computed the same eval metrics, equal to the logged ones (BERTFIT_PRINT_RANK_METRICS=1 makes
    each rank print them);
  - A's losses and learning rates equal the DDP reference's (LOSS_TOL, or BF16_LOSS_TOL under bf16), with the
    clipping threshold low enough (0.2) that several steps are clipped, and a logged grad norm that is a finite
    positive number equal to DDP's;
  - B's losses, learning rates and final metrics equal A's exactly (and the LR at step 5 is not 0);
  - A's exported best model loads with from_pretrained and reproduces the logged metrics; under ZeRO-3 its
    tensors have the full shapes of a freshly built model (not the empty shards of a partitioned one);
  - (ZeRO-2/3, bf16) docs/distributed.md's zero_to_fp32 command turns A's checkpoint into the fp32 weights.
Two "machines": each launch holds exactly one rank, and together they form one world of 2.

Tolerances. fp32 (DDP and every ZeRO stage): losses within 1e-5 absolute. Measured: identical to DDP's
(difference 0.0; 3e-8 once under offload) because ZeRO reduces and updates the same fp32 numbers, only in another
order. A 5% error in the learning rate moves these losses by up to 9e-4, so 1e-5 still tells a wrong LR, a missing
clip or a skipped accumulation step apart. bf16: DeepSpeed keeps bf16 weights and activations (8-bit
mantissa, about 3 significant digits) and fp32 master weights, so its losses differ from fp32 DDP's by up to
3e-3 over 8 steps; BF16_LOSS_TOL is 1e-2 (the LR itself is proven by the fp32 cases, which share its code path).
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.launch import (assert_two_ranks, eval_records, kill_tree, ranks, run, start, tail, train_command, train_env,
                          train_records, write_config)

pytestmark = pytest.mark.timeout(900)

STEPS, SAVE_AT = 8, 4
LOSS_TOL = 1e-5
BF16_LOSS_TOL = 1e-2
GRAD_NORM_RTOL, BF16_GRAD_NORM_RTOL = 1e-5, 5e-2
METRIC_TOL, BF16_METRIC_TOL = 1e-5, 1e-3  # export reloaded in fp32 vs metrics logged by the training processes
LAUNCH_TIMEOUT = 300  # a launch takes 10-40 s here; the first DeepSpeed one also builds a comm op (~40 s)
# metrics are a flat JSON object; [^{}]* still parses a record that another rank's output split from its newline
RANK_METRICS = re.compile(r"bertfit: rank (\d+) eval metrics at step (\d+): (\{[^{}]*\})")


@dataclass
class Case:
    accelerate_config: str
    overrides: tuple = ()
    reference: str = "ddp"  # which DDP run the losses are compared with
    machines: int = 1  # 2: two launches of one process each, as two machines on 127.0.0.1
    bf16: bool = False
    zero3: bool = False
    zero_to_fp32: bool = False  # also check the documented zero_to_fp32 command on A's checkpoint
    marks: list = field(default_factory=list)


DS = [pytest.mark.deepspeed]
CASES = {
    "ddp": Case("cpu.yaml"),
    "zero1": Case("zero1.yaml", marks=DS),
    "zero3": Case("zero3.yaml", zero3=True, zero_to_fp32=True, marks=DS),
    "zero3_offload": Case("zero3_offload.yaml", zero3=True, marks=DS),
    "zero3_bf16": Case("zero3.yaml", ("--mixed_precision", "bf16"), bf16=True, zero3=True, zero_to_fp32=True,
                       marks=DS),
    # ZeRO-2 runs with gradient accumulation 2 (one case for both keeps the matrix inside its time budget; ZeRO-1
    # covers DeepSpeed without accumulation)
    "zero2_accumulation2": Case("zero2.yaml", ("--gradient_accumulation_steps", "2"), reference="ddp_accumulation2",
                                zero_to_fp32=True, marks=DS),
    # multi_node.yaml trains in bf16 (autocast); said explicitly so this is also the "bf16 under DDP" case
    "two_node_ddp_bf16": Case("multi_node.yaml", ("--mixed_precision", "bf16"), bf16=True, machines=2),
    "two_node_zero3": Case("multi_node_zero3.yaml", zero3=True, machines=2, marks=DS),
}


# ----------------------------------------------------------------------------------------------- helpers
# (the `prepared` shards fixture is in conftest.py)
def run_config(tiny_model, data, out: Path, **over) -> dict:
    cfg = dict(model=str(tiny_model), data=str(data), output_dir=str(out), seed=7, max_steps=STEPS,
               per_device_batch_size=4, eval_batch_size=3, learning_rate=2e-3, warmup_steps=2, max_grad_norm=0.2,
               log_every_steps=1, save_every_steps=SAVE_AT, eval_every_steps=SAVE_AT, keep_last=10,
               report_to="none", dist_timeout_s=120)
    cfg.update(over)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, case: Case, config: Path, extra=()) -> Path:
    """Run one launch of ``case`` (two launches, one per "machine", for a 2-machine case); returns its log."""
    env = train_env(tmp, BERTFIT_PRINT_RANK_METRICS=1)
    overrides = (*case.overrides, *extra)
    log = tmp / f"{name}.log"
    started = time.time()
    if case.machines == 1:
        rc = run(train_command(config, 2, case.accelerate_config, overrides), log, env, timeout=LAUNCH_TIMEOUT)
        assert rc == 0, tail(log)
    else:
        port = free_port()
        procs, logs = [], []
        for machine in range(case.machines):
            node_log = tmp / f"{name}.machine{machine}.log"
            cmd = train_command(config, 2, case.accelerate_config, overrides, extra_launch=(
                "--num_machines", case.machines, "--machine_rank", machine, "--main_process_ip", "127.0.0.1",
                "--main_process_port", port))
            procs.append(start(cmd, node_log, env))
            logs.append(node_log)
        try:
            for proc, node_log in zip(procs, logs):
                left = max(LAUNCH_TIMEOUT - (time.time() - started), 1)
                assert proc.wait(timeout=left) == 0, tail(node_log)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name}: timed out (a hang?)\n" + "\n".join(tail(x) for x in logs)) from None
        finally:
            for proc in procs:
                kill_tree(proc)
        for machine, node_log in enumerate(logs):  # two launches that joined ONE world, one rank each
            found = [(r, w) for r, w, _ in ranks(node_log)]
            assert found == [(machine, 2)], f"machine {machine}: {found}\n{tail(node_log)}"
        log.write_text("".join(x.read_text(errors="replace") for x in logs))
    print(f"{name}: {time.time() - started:.1f} s")
    assert_two_ranks(log)
    return log


def check_rank_metrics(log: Path, out: Path) -> None:
    """Each rank printed the same metrics at every evaluation, and they are the ones rank 0 logged."""
    found: dict[int, dict[int, dict]] = {}
    for rank, step, text in RANK_METRICS.findall(log.read_text(errors="replace")):
        found.setdefault(int(step), {})[int(rank)] = json.loads(text)
    logged = {r["step"]: r["eval"] for r in eval_records(out)}
    assert logged and sorted(found) == sorted(logged), (sorted(found), sorted(logged))
    for step, by_rank in found.items():
        assert sorted(by_rank) == [0, 1], f"step {step}: metrics printed by ranks {sorted(by_rank)}"
        assert by_rank[0] == by_rank[1] == logged[step], f"step {step}: ranks disagree or differ from the log"


def reload_metrics(best: Path, data: Path, label_names: list[str]) -> dict:
    """Load the export with from_pretrained (in this process, not the trainer's) and score the validation split."""
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from train.evaluation import score

    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    assert model.dtype == torch.float32
    ds = datasets.load_from_disk(str(data / "validation"))
    logits = []
    with torch.no_grad():
        for row in ds:
            ids = torch.tensor([row["input_ids"]])
            logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].numpy())
    metrics, _ = score(np.array(logits), np.array(ds["label"]), np.array(ds["doc_id"]), "single_label", label_names,
                       "mean")
    return metrics


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model, prepared):
    """DDP runs the other cases are compared with, launched on first use: ``ddp`` (also case A of the DDP case)
    and ``ddp_accumulation2``."""
    data, _ = prepared
    done: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            tmp = tmp_path_factory.mktemp(f"ref_{name}")
            over = {"gradient_accumulation_steps": 2} if name == "ddp_accumulation2" else {}
            config = write_config(tmp / "run.yaml", **run_config(tiny_model, data, tmp / "out", **over))
            log = launch(tmp, name, CASES["ddp"], config)
            done[name] = (tmp / "out", log)
        return done[name]

    return get


# -------------------------------------------------------------------------------------------------- matrix
@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_distributed_case(name, tmp_path, tiny_model, prepared, references):
    case = CASES[name]
    data, manifest = prepared
    started = time.time()
    ref_out, _ = references(case.reference)

    # A: the uninterrupted run (the DDP case's A is the reference itself)
    if name == "ddp":
        out, log = references("ddp")
    else:
        out = tmp_path / "a"
        config = write_config(tmp_path / "a.yaml", **run_config(tiny_model, data, out))
        log = launch(tmp_path, "a", case, config)
    check_rank_metrics(log, out)

    ref, got = train_records(ref_out), train_records(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    loss_tol = BF16_LOSS_TOL if case.bf16 else LOSS_TOL
    norm_rtol = BF16_GRAD_NORM_RTOL if case.bf16 else GRAD_NORM_RTOL
    for s in ref:
        assert got[s]["train/lr"] == ref[s]["train/lr"], f"LR differs at step {s}"
        assert got[s]["train/loss"] == pytest.approx(ref[s]["train/loss"], abs=loss_tol), f"loss at step {s}"
        norm = got[s]["train/grad_norm"]
        assert math.isfinite(norm) and norm > 0, f"grad norm at step {s}: {norm}"
        assert norm == pytest.approx(ref[s]["train/grad_norm"], rel=norm_rtol), f"grad norm at step {s}"
    assert sum(r["train/grad_norm"] > 0.2 for r in ref.values()) >= 2, "clipping was never exercised"

    # the exported best model: a normal save_pretrained folder that reproduces the logged metrics
    best = out / "best"
    logged = [r for r in eval_records(out) if r["best"]][-1]["eval"]
    assert json.loads((best / "metrics.json").read_text()) == logged
    assert json.loads((best / "config.json").read_text())["dtype"] == "float32"
    reloaded = reload_metrics(best, data, manifest["labels"])
    for key, value in logged.items():
        assert reloaded[key] == pytest.approx(value, abs=BF16_METRIC_TOL if case.bf16 else METRIC_TOL), key
    if case.zero3:
        assert_full_sized_export(best, tiny_model)
    if case.zero_to_fp32:
        check_zero_to_fp32(out, best, tmp_path, case.bf16)

    # B: a fresh launch resumes from A's step-4 checkpoint and must continue exactly as A did
    resume_from = out / "checkpoints" / f"step-{SAVE_AT}"
    assert (resume_from / "loop_state.json").exists()
    out_b = tmp_path / "b"
    config_b = write_config(tmp_path / "b.yaml", **run_config(tiny_model, data, out_b, resume=str(resume_from)))
    log_b = launch(tmp_path, "b", case, config_b)
    assert f"resumed from {resume_from} (epoch 0, step {SAVE_AT})" in log_b.read_text(), tail(log_b)
    check_rank_metrics(log_b, out_b)
    resumed = train_records(out_b)
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1)), "B logged steps it should not have retrained"
    assert resumed[SAVE_AT + 1]["train/lr"] > 0, "a resume check at LR 0 proves nothing"
    for s in resumed:
        assert resumed[s]["train/lr"] == got[s]["train/lr"]
        assert resumed[s]["train/loss"] == got[s]["train/loss"], f"resumed loss differs at step {s}"
        assert resumed[s]["train/grad_norm"] == got[s]["train/grad_norm"], f"resumed grad norm differs at step {s}"
    assert eval_records(out_b)[-1]["eval"] == eval_records(out)[-1]["eval"]
    print(f"{name}: {time.time() - started:.1f} s in all")


def assert_full_sized_export(best: Path, tiny_model: Path) -> None:
    """ZeRO-3 partitions every parameter; the export must hold the gathered, full tensors under the usual names."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model, num_labels=2)
    fresh = {k: tuple(v.shape) for k, v in AutoModelForSequenceClassification.from_config(config).state_dict().items()}
    with safe_open(str(best / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    missing = set(fresh) - set(saved)
    assert not missing - {k for k in missing if "position_ids" in k}, f"not exported: {sorted(missing)[:5]}"
    assert set(saved) <= set(fresh), f"unexpected tensor names: {sorted(set(saved) - set(fresh))[:5]}"
    for k, shape in saved.items():
        assert shape == fresh[k] and 0 not in shape, f"{k}: exported {shape}, a fresh model has {fresh[k]}"
    assert dtypes == {"F32"}, dtypes
    assert sum(math.prod(s) for s in saved.values()) > 10_000


def check_zero_to_fp32(out: Path, best: Path, tmp: Path, bf16: bool) -> None:
    """docs/distributed.md's command turns the ZeRO checkpoint of the best step into fp32 weights: the export's
    weights exactly (fp32 run), or the fp32 master weights whose bf16 rounding is the export (bf16 run)."""
    import torch
    from safetensors.torch import load_file

    step = json.loads((best / "bertfit.json").read_text())["step"]
    ckpt = out / "checkpoints" / f"step-{step}"
    fp32 = tmp / "fp32"
    cmd = [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(fp32), "--safe_serialization"]
    r = subprocess.run(cmd, cwd=tmp, env=train_env(tmp), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    master, exported = load_file(fp32 / "model.safetensors"), load_file(best / "model.safetensors")
    assert set(master) == set(exported)
    for k, v in exported.items():
        assert master[k].dtype == torch.float32
        expected = master[k].to(torch.bfloat16).float() if bf16 else master[k]
        assert torch.equal(expected, v), k
    if bf16:
        assert any(not torch.equal(master[k], v) for k, v in exported.items()), "no fp32 master weights?"
    # the documented copy of config and tokenizer makes it a from_pretrained folder
    subprocess.run(f"find {best} -maxdepth 1 -type f ! -name 'model*.safetensors*' -exec cp {{}} {fp32}/ \\;",
                   shell=True, check=True)
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(fp32).state_dict()
    assert all(torch.equal(reloaded[k], master[k]) for k in master)
