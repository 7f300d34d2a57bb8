"""Test-wide set-up: runtime shape checking and a small CPU thread budget."""

import os

# jaxtyping annotations on public forwards are checked by beartype during the test run.
# The hook must be installed before the packages are first imported.
from jaxtyping import install_import_hook

install_import_hook(["spacetime", "unets", "diffusion"], "beartype.beartype")

import torch  # noqa: E402

# Under pytest-xdist each worker gets one thread: two workers on two cores, no oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=15, derandomize=True)
settings.load_profile("default")
