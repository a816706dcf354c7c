import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads
# this variable when a kernel is decorated, so it must be set before sdpa_pass is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fresh_dynamo():
    """A test that compiles starts and ends with an empty Dynamo cache and a fixed seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Every test starts without remembered launches (kernels/launch.py), so a test that
    swaps a path chooser or a launch sees its own calls take the full path."""
    from sdpa_pass.kernels.launch import clear_plans

    clear_plans()
