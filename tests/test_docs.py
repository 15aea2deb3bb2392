"""The README, --help and the code agree: every config field and data_prep option is documented."""

import dataclasses
import re
from pathlib import Path

from data_prep.cli import build_parser
from train.config import EarlyStoppingConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"  # CI runs exactly the README's test command


def test_readme_documents_every_config_field():
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` |" in README, f.name
    for f in dataclasses.fields(EarlyStoppingConfig):
        assert f.name in README, f.name


def test_readme_documents_every_data_prep_option():
    for action in build_parser()._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                assert f"`{opt}" in README, opt


def test_readme_names_existing_files():
    for path in set(re.findall(r"\b((?:accelerate_configs|slurm|train/configs|docs)/[\w./-]+\.\w+)", README)):
        assert (ROOT / path).exists(), path
