"""Tensor ops behind the token mixers: pure functions, each with a PyTorch reference and a Triton kernel.

Canonical layout, shared by every op:

* ``q, k, v``: ``[B, H, N, D]`` (batch, heads, tokens, head dim), any strides, fp32/bf16/fp16; prefix tokens
  (CLS, registers) first, then the patch grid in row-major order, as in the host model.
* per-token, per-head scalars (key weights): ``[B, H, N]``; per-channel gates/decays: ``[B, H, N, D]``.
* outputs: ``[B, H, N, D]`` in the dtype of ``q``. Reductions (sums over tokens, states, softmax denominators)
  accumulate in fp32; the output is cast once, at the end.

Each op lives in ``kernels/<op>/`` as ``reference.py`` (readable PyTorch; the specification, math in docstrings) and
``triton.py`` (same signature). :mod:`visionfx.kernels.dispatch` chooses between them and says why.
"""
