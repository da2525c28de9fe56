"""Property-based shapes (hypothesis): any N, H, V, M, duplicate kl_index, ignore pattern and chunk budget."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import ALL_OPTIONS, PRECISION, assert_matches_reference, make_problem

import trace_kernels as tk


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), h=st.integers(1, 20), v=st.integers(1, 90), m=st.integers(1, 50),
       seed=st.integers(0, 2**16), budget=st.sampled_from([1e-4, 1e-3, 1e-2, 10.0]),
       options=st.sets(st.sampled_from(ALL_OPTIONS)))
def test_any_shape_matches_reference(impl, n, h, v, m, seed, budget, options):
    dtype, tol = PRECISION[impl]
    with tk.chunk_budget(budget):
        assert_matches_reference(impl, make_problem(n=n, h=h, v=v, m=m, options=tuple(options), seed=seed,
                                                    dtype=dtype), tol=tol)
