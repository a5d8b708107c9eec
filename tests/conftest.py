"""Test set-up: CPU only, Triton kernels through the interpreter."""

import os

# Must be set before triton is imported: kernels then run on CPU tensors through numpy.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach the network: the Hub client answers from local files or fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


# Test tensors are tiny: one thread avoids the cost of splitting each small op across cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
