"""The README's examples run, and its test command is what CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_run_in_order():
    """The python blocks read as one session: each may use what an earlier one defined."""
    assert PYTHON_BLOCKS, "README has no python example"
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(PYTHON_BLOCKS):
        exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)


def test_readme_has_the_two_setup_commands_and_ci_runs_the_test_one():
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    commands = [line for line in bash.splitlines() if line.startswith("bash scripts/bootstrap.sh && ")]
    assert len(commands) >= 2, "README must hold the main-job and test commands"
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
