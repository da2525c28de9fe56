import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Implementations whose values and gradients the contract tests (CPU tensors) check against the fp64
# reference. Triton joins under TRITON_INTERPRET=1 (as `make test` runs), twice: with its default
# vocabulary block (one block per row at the test vocabularies) and with 16-wide blocks, so that every
# sweep crosses many blocks and the online max / sum rescaling and the ragged last block are exercised.
# On CUDA the kernels are checked by test_cuda.py.
IMPLS = ["torch"]
if os.environ.get("TRITON_INTERPRET") == "1":
    IMPLS += ["triton", "triton-b16"]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    if request.param == "triton-b16":
        if request.node.get_closest_marker("one_block_size"):
            pytest.skip("block size is not what this test varies (and 16-wide blocks are slow to interpret)")
        from trace_kernels import rows_triton

        monkeypatch.setattr(rows_triton, "MAX_BLOCK_V", 16)
        return "triton"
    return request.param
