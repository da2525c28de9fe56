import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Implementations whose values and gradients the contract tests check against the fp64 reference.
# Triton joins on CUDA, or on the CPU under TRITON_INTERPRET=1.
IMPLS = ["torch"]
if os.environ.get("TRITON_INTERPRET") == "1":
    IMPLS.append("triton")
else:
    try:
        import torch

        if torch.cuda.is_available():
            IMPLS.append("triton")
    except ImportError:
        pass


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param
