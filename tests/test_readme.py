"""The README's commands are the ones CI and the demo run, so the docs cannot go stale."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up: the two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].strip() in ci.splitlines(), "'.ci/run' must run exactly the README's test command"
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1], "torch must be pinned"


def test_readme_recipes_table_matches_builtin_recipes():
    from qcompiler.recipes import BUILTIN_RECIPES

    text = (ROOT / "README.md").read_text()
    for name in BUILTIN_RECIPES:
        assert f"`{name}`" in text, f"recipe {name} is not documented"


@pytest.mark.slow
def test_demo_command_runs_on_smollm2(tmp_path):
    pytest.importorskip("torch")
    from qcompiler.models.smollm2 import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except Exception as err:
        pytest.skip(str(err))
    demo = _setup_commands()[0].split("&&")[-1].strip()
    args = shlex.split(demo)
    assert args[:2] == ["python", "examples/demo.py"]
    small = ["--work", str(tmp_path), "--calib-windows", "2", "--eval-windows", "1", "--seq-len", "64"]
    run = subprocess.run([sys.executable, "examples/demo.py", *small], cwd=ROOT, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| w8a8-smoothquant |" in run.stdout
