"""The README's commands and Quickstart run as written."""

import os
import re
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quickstart_runs_as_written(monkeypatch):
    readme = (REPO / "README.md").read_text()
    (quickstart,) = re.findall(r"## Quickstart\n\n```python\n(.*?)```", readme, flags=re.S)
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(quickstart, "README.md (Quickstart)", "exec"), namespace)
    assert namespace["result"].masks.shape[0] == namespace["result"].presence_scores.shape[0] > 0
    assert len(namespace["results"]) == 2 and all(result.masks.shape == namespace["result"].masks.shape
                                                  for result in namespace["results"])


def test_the_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    (command,) = re.findall(r"Run the tests:\n\n```bash\n(.*?)\n```", readme, flags=re.S)
    assert ci.rstrip().splitlines()[-1] == command
    assert os.access(REPO / ".ci" / "run", os.X_OK)
