"""The top-level kernels/ folder never shadows the `kernels` distribution that transformers imports.

From the repository root, the root is first on ``sys.path`` (``python -c``, ``python -m``,
pytest). transformers 5.25 and later import Hugging Face's ``kernels`` package while building a
model; when our folder answered to that name, every BERT failed to build. The dev extra installs
the real distribution, so these subprocesses meet the clash exactly as a user's environment would.
"""

import importlib.metadata
import subprocess
import sys
import textwrap

from tests.helpers import ROOT


def run_from_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_real_kernels_distribution_is_installed():
    importlib.metadata.version("kernels")  # the dev extra installs it: the next test needs it


def test_transformers_and_fastmsd_kernels_both_import_from_the_root():
    code = textwrap.dedent(f"""
        import importlib.metadata
        from pathlib import Path

        import kernels
        import torch
        from transformers import BertConfig, BertModel

        import fastmsd.kernels.msd_loss

        root = Path({str(ROOT)!r})
        dist = importlib.metadata.distribution("kernels")
        assert Path(kernels.__file__) == Path(dist.locate_file("kernels/__init__.py")), kernels.__file__
        model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100))
        out = model(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
        assert out.shape == (1, 4, 32), out.shape
        source = Path(fastmsd.kernels.msd_loss.__file__).resolve()
        assert source == root / "kernels" / "msd_loss.py", source
        print("ok")
    """)
    proc = run_from_root("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_bench_runs_as_a_module_from_the_root():
    proc = run_from_root("-m", "bench.loss", "--help")
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-3000:]
