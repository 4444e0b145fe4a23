"""scripts/gpu-study.sh: a lent GPU machine whose packages lie outside pyproject.toml's bounds is refused before anything runs."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def versions(pyproject: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu-study.sh"), "versions", str(pyproject)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_the_project_s_own_packages_pass_the_version_check():
    result = versions(REPO / "pyproject.toml")
    assert result.returncode == 0, result.stderr
    assert "within pyproject.toml's bounds" in result.stdout


def test_a_machine_with_a_transformers_below_the_bound_is_refused(tmp_path):
    import transformers

    pyproject = tmp_path / "pyproject.toml"
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    bound = '"transformers>=5.25,<6"'
    assert bound in text
    pyproject.write_text(text.replace(bound, '"transformers>=99"'), encoding="utf-8")  # as if this machine's were too old
    result = versions(pyproject)
    assert result.returncode == 2
    assert f"transformers {transformers.__version__} (the project needs >=99)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
