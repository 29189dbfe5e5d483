import os

# Inductor's FX-graph / autograd caches do not notice edits to custom-op code: never reuse them in tests.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts with fresh Dynamo caches, counters and a fixed seed."""
    import locattn

    torch._dynamo.reset()
    locattn.reset_counters()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
