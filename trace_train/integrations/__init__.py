"""Integrations of trace_kernels' losses into other trainers (each imports its trainer library lazily)."""
