"""README's "Your own method" example, run as the README gives it: its code block saved as a module,
its command through the CLI; it must beat zero-shot by the margin the README states."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import REPO, requires_shipped
from vlweak.cli import build_cli
from vlweak.labels import PseudoLabels


def _readme_example() -> tuple[str, list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own method"):]
    section = section[: section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ").split()
    return code, command


@requires_shipped
def test_readme_method_runs_and_beats_zero_shot(tmp_path, monkeypatch):
    code, command = _readme_example()
    (tmp_path / "my_methods.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_methods", None)
    assert command[:3] == ["PYTHONPATH=.", "vlweak", "test"]
    args = [a.replace("recipes/", f"{REPO}/recipes/") for a in command[2:]]
    common = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    ours = build_cli([*args, *common])
    base = build_cli([*[a for a in args if not a.startswith("--model=")], *common])
    acc, zs = ours.model.last_metrics["test/acc"], base.model.last_metrics["test/acc"]
    assert type(ours.model).__name__ == "BalancedZeroShot"
    assert acc == pytest.approx(0.780, abs=0.0015) and zs == pytest.approx(0.656, abs=0.0015), (acc, zs)
    art = PseudoLabels.load(ours.model.last_artifact)
    assert len(art) == 1000 and art.provenance["method"] == "BalancedZeroShot"
