"""``visionfx.explain`` reports the backend for the model's own device and dtype, also for a mixer that adds no
parameters (agentsd)."""

from __future__ import annotations

import io

import timm
import torch

import visionfx


def _tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=1, num_heads=2).eval()


def test_parameterless_mixer_reports_for_the_hosts_dtype():
    # forced Triton backend on a float64 model: the kernel refuses float64, whatever the mixer's own parameters are
    for method in ("agent", "agentsd"):
        model = _tiny().double()
        visionfx.patch(model, method, backend="triton")
        (row,) = visionfx.explain(model, file=io.StringIO())
        # (without a GPU, conftest.py runs Triton in its interpreter, so forcing it reaches the dtype check)
        assert row["backend"] == "error" and "float64" in row["why"], row


def test_explain_lists_sites_and_added_parameters():
    model = _tiny()
    visionfx.patch(model, "agentsd")
    out = io.StringIO()
    rows = visionfx.explain(model, file=out)
    assert [r["path"] for r in rows] == ["blocks.0.attn"]
    assert rows[0]["params_added"] == 0 and "agentsd" in out.getvalue()
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()
