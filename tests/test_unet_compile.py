"""Every registered U-Net compiles with `torch.compile(fullgraph=True)` for a fixed shape and
matches eager mode (debug preset).

Why a subprocess: the test suite's conftest installs jaxtyping's import hook, which wraps
every annotated forward in a beartype checker; dynamo cannot trace those wrappers (it fails
inside beartype's introspection). The library itself carries no decorators, so users compile
the plain modules: the child process imports `unets` without the hook, as a user would.
The default run uses dynamo's `eager` backend, which proves the whole forward is captured as
one graph (the property `fullgraph=True` asserts) in seconds; the inductor run (real code
generation, minutes on a shared CPU) is marked slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import unets

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, torch, unets
    backend, names = sys.argv[1], sys.argv[2:]
    for name in names:
        torch.manual_seed(0)
        model = unets.build(name, preset="debug").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        side = model.size_multiple * max(1, 8 // model.size_multiple)
        x = torch.randn(2, model.config.channels, 2 * model.frame_multiple, side, side)
        t = torch.tensor([3, 700])
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with torch.no_grad():
            eager = model(x, t)
            out = compiled(x, t)
            again = compiled(x, t)
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5, msg=name)
        print("OK", name, float((out - eager).abs().max()))
    """
)


def _run(names: list[str], backend: str, tmp_path: Path, timeout: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, *names],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("OK")] == names


# One child process for all U-Nets: torch and dynamo start once.
def test_fullgraph_compile_matches_eager(tmp_path):
    _run(unets.available(), "eager", tmp_path, timeout=600)


@pytest.mark.slow
def test_inductor_compile_matches_eager(tmp_path):
    _run(unets.available(), "inductor", tmp_path, timeout=1800)
