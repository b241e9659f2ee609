"""PyTorch reference of the non-causal linear-attention family (serves slab, inline and rala).

Per batch element and head, with ``φ`` the feature map, ``w_j`` optional key weights and ``R_i`` optional rotations:

* divisive (slab, rala)::

      o_i = (R_i φ(q_i)) · Σ_j w_j (R_j φ(k_j))ᵀ v_j  /  ( φ(q_i) · Σ_j w_j φ(k_j) + eps )

  (numerator rotated, denominator not; without key weights ``w_j = 1``).
* subtractive (inline), centred form::

      k̄ = mean_j φ(k_j),  v̄ = mean_j v_j,  Σ_kv = (1/N) Σ_j (φ(k_j) − k̄)ᵀ (v_j − v̄)
      o_i = v̄ + scale · φ(q_i) Σ_kv

  which equals ``Σ_j w_ij v_j`` with ``w_ij = (scale/N)(φ(q_i)·φ(k_j) − φ(q_i)·k̄) + 1/N`` (rows sum to 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["linear_attention_reference", "feature_map", "apply_rope", "FEATURES", "NORMALIZERS"]

FEATURES = ("identity", "relu", "elu1")
NORMALIZERS = ("divisive", "subtractive")


def feature_map(x: torch.Tensor, feature: str) -> torch.Tensor:
    """``identity``, ``relu`` or ``elu1`` (ELU(x) + 1, positive)."""
    if feature == "identity":
        return x
    if feature == "relu":
        return F.relu(x)
    if feature == "elu1":
        # exp(x) directly for x <= 0: F.elu(x) + 1 loses relative precision there
        return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))
    raise ValueError(f"unknown feature map {feature!r}; choose from {FEATURES}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2p, 2p+1)`` of ``x [..., N, D]`` by angles with ``cos, sin [N, D/2]``."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature: str = "identity",
    normalizer: str = "divisive",
    scale: float = 1.0,
    key_weights: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Non-causal linear attention, computed in fp32 (float64 inputs stay float64).

    Args:
        q, k, v: ``[B, H, N, D]``.
        feature: ``"identity"``, ``"relu"`` or ``"elu1"``, applied to q and k.
        normalizer: ``"divisive"`` or ``"subtractive"`` (see the module docstring).
        scale: multiplies ``φ(q)·φ(k)`` in the subtractive form (ignored by the divisive form, where it cancels).
        key_weights: ``[B, H, N]`` weights ``w_j`` of the keys (divisive only).
        rope: ``(cos, sin)``, each ``[N, D/2]``, rotating the numerator's q and k (divisive only).
        eps: added to the divisive denominator.

    Returns:
        ``[B, H, N, D]`` in the dtype of ``q``.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose from {NORMALIZERS}")
    if normalizer == "subtractive" and (key_weights is not None or rope is not None):
        raise ValueError("key_weights and rope apply to the divisive normaliser only")
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qf = feature_map(q.to(acc), feature)
    kf = feature_map(k.to(acc), feature)
    vf = v.to(acc)
    if normalizer == "subtractive":
        n = k.shape[-2]
        k_mean = kf.mean(dim=-2, keepdim=True)
        v_mean = vf.mean(dim=-2, keepdim=True)
        kv = (kf - k_mean).transpose(-1, -2) @ (vf - v_mean) / n  # [B, H, D, D]; centring v too is exact and tighter
        return (v_mean + scale * (qf @ kv)).to(dtype)
    kw = kf if key_weights is None else kf * key_weights.to(acc).unsqueeze(-1)
    den = qf @ kw.sum(dim=-2).unsqueeze(-1) + eps  # [B, H, N, 1]
    if rope is not None:
        cos, sin = (t.to(acc) for t in rope)
        qn, kn = apply_rope(qf, cos, sin), apply_rope(kw, cos, sin)
    else:
        qn, kn = qf, kw
    num = qn @ (kn.transpose(-1, -2) @ vf)
    return (num / den).to(dtype)
