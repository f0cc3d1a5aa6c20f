"""The examples run: a few steps of each, on the CPU (the numbers are not checked, only that both the torch and
the danlu runs train, report and plot)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "train_digits.py"


def run(*args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def test_train_digits_a_few_steps(tmp_path):
    pytest.importorskip("sklearn", reason="examples/train_digits.py needs scikit-learn for its data (load_digits)")
    result = run(str(DIGITS), "--epochs", "2", "--max-steps", "3", "--batch-size", "32", "--threads", "1",
                 "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epochs) == 2
    for line in epochs:
        torch_part, danlu_part = line.split("|")
        assert "torch: loss" in torch_part and "danlu: loss" in danlu_part and "nan" not in line
    assert "epochs 1-1 AdamW, 2-2 SGD-Nesterov" in result.stdout and "torch's total / danlu's total" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in result.stdout
    else:
        assert (tmp_path / "digits.png").stat().st_size > 0


def test_train_digits_says_what_is_missing_without_sklearn(tmp_path):
    code = ("import runpy, sys; sys.modules['sklearn'] = None; "  # makes `import sklearn` raise ImportError
            f"sys.argv = ['train_digits.py', '--epochs', '2', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(DIGITS)!r}, run_name='__main__')")
    result = run("-c", code)
    assert result.returncode == 1
    assert "pip install scikit-learn" in result.stderr and "Traceback" not in result.stderr
