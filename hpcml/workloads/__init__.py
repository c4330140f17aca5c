"""Workloads hpcml ships beside the digits MLP, written as user code is: `_target_`s through the seam.

- lm: a byte-level decoder-only transformer on the Python standard library's own source (`+experiment=lm`).
"""
