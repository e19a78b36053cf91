"""Every W&B sweep file expands into a command line the vlweak CLI accepts."""

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from vlweak.cli import build_cli

SWEEPS = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))
METHODS = {"zeroshot", "chils", "zlap", "dualcoop", "prompt_tuning", "coop", "cdul", "pretrain"}


def sample(spec: dict) -> dict:
    """One grid point of the sweep: parameter ``j`` takes its ``j``-th value (cyclically), so the
    first parameter takes its first value and the others other ones; a distribution gives its max."""
    point = {}
    for j, (key, p) in enumerate(spec["parameters"].items()):
        if "values" in p:
            point[key] = p["values"][j % len(p["values"])]
        elif "value" in p:
            point[key] = p["value"]
        else:
            point[key] = p["max"]
    return point


def expand(spec: dict, point: dict) -> list[str]:
    """The agent's command line for ``point`` after the ``vlweak`` program name."""
    args = []
    for item in spec["command"]:
        if item == "${env}":
            continue
        if item == "${args}":
            args += [f"--{k}={v}" for k, v in point.items()]
        else:
            assert not item.startswith("${"), f"unsupported macro {item}"
            args.append(item)
    assert args[0] == "vlweak", args
    return args[1:]


def test_every_method_has_a_sweep():
    assert {p.stem for p in SWEEPS} == METHODS


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_command_is_accepted(path: Path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] in ("grid", "random", "bayes") and spec["metric"]["name"]
    assert (REPO / spec["command"][spec["command"].index("--config") + 1]).is_file()
    point = sample(spec)
    with pytest.raises(SystemExit) as exit_:
        build_cli([*expand(spec, point), "--print_config"])
    assert exit_.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    assert config["trainer"]["logger"]["init_args"].get("version") is None  # one W&B run id per agent run
    for key, value in point.items():  # the swept value reached the resolved config
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, node, value)


def test_a_bad_key_is_refused(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "recipes" / "sweeps" / "zlap.yaml").read_text())
    with pytest.raises(SystemExit) as exit_:
        build_cli([*expand(spec, {"model.init_args.kk": 3}), "--print_config"])
    assert exit_.value.code not in (0, None)
    assert "kk" in capsys.readouterr().err
