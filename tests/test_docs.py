"""The README, --help and the code agree: every config field and data_prep option is documented."""

import dataclasses
import re
from pathlib import Path

from data_prep.cli import build_parser
from train.config import EarlyStoppingConfig, TrainConfig
from train.speedups import SpeedupsConfig

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
    for f in dataclasses.fields(SpeedupsConfig):
        assert f"| `speedups.{f.name}` |" in README, f.name


def test_readme_documents_every_data_prep_option():
    for action in build_parser()._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and opt != "--help":
                assert f"`{opt}" in README, opt


def test_readme_names_existing_files():
    for path in set(re.findall(r"\b((?:accelerate_configs|slurm|train/configs|docs)/[\w./-]+\.\w+)", README)):
        assert (ROOT / path).exists(), path


def test_pyproject_lower_bounds_are_the_checked_minimums():
    """pyproject.toml states the bounds train/versions.py checks at start-up (found by running the tests
    against older releases): the two lists cannot drift apart."""
    import tomllib

    from train.versions import MINIMUM

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][0-9.]*)", dep.split(";")[0].strip())
        assert m, f"not a plain lower bound: {dep}"
        bounds[m.group(1).lower()] = m.group(2)
    for name, minimum in MINIMUM.items():
        assert bounds.get(name) == minimum, (name, bounds.get(name), minimum)


def test_an_outdated_dependency_is_named_in_one_line(monkeypatch):
    import train.versions as versions

    real = versions.version
    monkeypatch.setattr(versions, "version", lambda name: "4.40.0" if name == "transformers" else real(name))
    problem = versions.version_problem()
    assert problem == ("outdated packages: transformers 4.40.0 (needs >= 5.7); upgrade them "
                       "(pip install -U transformers)")
    monkeypatch.setattr(versions, "version", real)
    assert versions.version_problem() is None  # this environment itself is new enough


def test_the_default_objective_is_the_best_measured_one():
    """Issue 20: the objective/doc_pooler defaults are the best setting of docs/results/long_documents.json
    (bench/long_documents.py's rule); while runs are missing, the default stays window and the docs say so."""
    import json

    from bench.long_documents import BBC_SEEDS, LONGDOC_SEEDS, SELECTABLE, SECTION, chosen_default, parse_seeds

    res = json.loads((ROOT / "docs" / "results" / "long_documents.json").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    best, _ = chosen_default(res, parse_seeds(LONGDOC_SEEDS), parse_seeds(BBC_SEEDS))
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    section = docs[docs.index(f"<!-- {SECTION[0]}:start -->"):docs.index(f"<!-- {SECTION[0]}:end -->")]
    if best is None:
        assert defaults["objective"] == "window" and "not chosen yet" in section
    else:
        objective, pooler = SELECTABLE[best]
        assert defaults["objective"] == objective and f"**{best}**" in section
        if objective == "document":
            assert defaults["doc_pooler"] == pooler
