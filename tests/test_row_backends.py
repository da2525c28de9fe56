"""The row-backend seam (trace_kernels/_chunk.py): both backends take the same ChunkInputs and return the
same ChunkOutputs; the Triton one writes dz in the GEMM's input dtype, rounded once after the temperature
and the distilled rows' terms are in (runs under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from trace_kernels import rows_torch
from trace_kernels._chunk import ChunkInputs
from trace_kernels._gemm import Workspace
from trace_kernels.pg import pg_rows

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on the CPU interpreter")


def _chunk(dz_dtype, seed=0, c=5, k=4, v=37, kl_clip_mode="value"):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(c, v, generator=g) * 3
    u = torch.randn(k, v, generator=g) * 3
    local = torch.tensor([0, 2, 2, 4])  # sorted, with a duplicate
    targets = torch.randint(0, v, (c,), generator=g)
    return ChunkInputs(z_CV=z, targets_C=targets, inv_t=1 / 0.7, u_KV=u, local_K=local,
                       fkl_weight_K=torch.rand(k, generator=g), rkl_weight_K=torch.rand(k, generator=g),
                       kl_term_clip=0.05, kl_clip_mode=kl_clip_mode,
                       entropy_weight_C=-0.01 * torch.rand(c, generator=g), need_grad=True, dz_dtype=dz_dtype)


def _pg(chunk):
    c = chunk.z_CV.shape[0]
    adv = torch.linspace(-1, 1, c)

    def pg(logp, ent):
        return pg_rows(logp, ent, torch.ones(c, dtype=torch.bool), adv, torch.full((c,), 1 / c), logp.detach() + 0.1,
                       None, chunk.entropy_weight_C, beta=0.0, clip_low=0.2, clip_high=0.28, dual_clip=None)
    return pg


def _run(backend, dz_dtype, kl_clip_mode="value"):
    chunk = _chunk(dz_dtype, kl_clip_mode=kl_clip_mode)
    c, v = chunk.z_CV.shape
    ws = Workspace(v, torch.float32, torch.device("cpu"), student_rows=c, teacher_rows=chunk.u_KV.shape[0])
    return backend.chunk_rows(ws, chunk, _pg(chunk))


@pytest.mark.parametrize("kl_clip_mode", ["value", "grad"])
def test_backends_agree_on_every_output(kl_clip_mode):
    from trace_kernels import rows_triton

    a, b = _run(rows_torch, torch.float32, kl_clip_mode), _run(rows_triton, torch.float32, kl_clip_mode)
    for name in ("logp_C", "entropy_C", "loss_C", "fkl_K", "rkl_K", "dz_CV"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=2e-5, atol=2e-6, msg=name)


def test_triton_writes_dz_in_the_gemm_dtype_rounded_once():
    """fp16 here; bf16 on CUDA only (tests/test_cuda.py): the interpreter's fp32 -> bf16 conversion does not
    round to nearest as torch's does (measured: 101 of 185 entries one bf16 ulp off)."""
    from trace_kernels import rows_triton

    dz_dtype = torch.float16
    wide, narrow = _run(rows_triton, torch.float32), _run(rows_triton, dz_dtype)
    assert narrow.dz_CV.dtype == dz_dtype
    torch.testing.assert_close(narrow.dz_CV, wide.dz_CV.to(dz_dtype), rtol=0, atol=0)
    torch.testing.assert_close(narrow.loss_C, wide.loss_C, rtol=0, atol=0)
