import os

# Inductor's FX-graph / autograd caches do not notice edits to custom-op code: never reuse them in tests.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def _import_triton_for_the_interpreter() -> None:
    """Without a GPU, Triton only runs under its interpreter, and Triton decides per ``@triton.jit`` function at
    decoration time, its own standard library included (``tl.zeros`` ...). If anything (diffusers, Inductor)
    imports triton first without ``TRITON_INTERPRET=1``, interpreted kernels later fail with "Cannot call
    @triton.jit'd outside of the scope of a kernel". So import it here, in interpreter mode, before any test
    module; the variable itself is restored, so the automatic dispatch of other tests does not change."""
    if torch.cuda.is_available():
        return
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


_import_triton_for_the_interpreter()


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts with fresh Dynamo caches, counters and a fixed seed."""
    import locattn

    torch._dynamo.reset()
    locattn.reset_counters()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
