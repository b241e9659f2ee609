"""The DiT re-implementation (visionfx.models.dit) against the formulas of METHODS.md §8 / the DiT paper: the sin-cos
position table and timestep embedding written out with ``math``, unpatchify against an explicit loop, adaLN-Zero
initialisation, classifier-free guidance, and the official parameter count of DiT-XL/2."""

from __future__ import annotations

import math

import torch

from visionfx.models.dit import DIT_MODELS, DiT, TimestepEmbedder, dit_xl_2, sincos_pos_embed_2d
from families import FAMILIES


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family].build(), FAMILIES[family].inputs(0)


def test_dit_sincos_table_and_timestep_embedding():
    H, W, D = 3, 5, 8
    table = sincos_pos_embed_2d(D, (H, W))
    for r in range(H):
        for c in range(W):
            for i in range(D // 4):
                w = 10000 ** (-i / (D // 4))
                row = table[r * W + c]
                assert math.isclose(row[i], math.sin(c * w), abs_tol=1e-12)
                assert math.isclose(row[D // 4 + i], math.cos(c * w), abs_tol=1e-12)
                assert math.isclose(row[D // 2 + i], math.sin(r * w), abs_tol=1e-12)
                assert math.isclose(row[3 * D // 4 + i], math.cos(r * w), abs_tol=1e-12)
    t = torch.tensor([0.0, 7.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 7)
    for b, tv in enumerate(t.tolist()):
        for i in range(3):
            f = math.exp(-math.log(10000) * i / 3)
            assert math.isclose(emb[b, i], math.cos(tv * f), abs_tol=1e-4)
            assert math.isclose(emb[b, 3 + i], math.sin(tv * f), abs_tol=1e-4)
    assert torch.equal(emb[:, 6], torch.zeros(3))


def test_dit_unpatchify_inverts_patch_order_and_init():
    model = DiT(input_size=(4, 6), patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                num_classes=3, learn_sigma=False)
    img = torch.arange(24.0).reshape(1, 1, 4, 6)
    tokens = torch.zeros(1, 6, 4)
    for r in range(2):
        for c in range(3):
            for pr in range(2):
                for pc in range(2):
                    tokens[0, r * 3 + c, pr * 2 + pc] = img[0, 0, 2 * r + pr, 2 * c + pc]
    assert torch.equal(model.unpatchify(tokens), img)
    # adaLN-Zero: the output Linear and every modulation start at zero, so the model predicts zeros
    out = model(torch.randn(2, 1, 4, 6), torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))
    assert out.shape == (2, 1, 4, 6) and torch.equal(out, torch.zeros_like(out))


def test_dit_label_dropout_and_cfg():
    model, (x, t, y) = build("dit")
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    assert torch.equal(emb.token_drop(y, torch.tensor([1, 0])), torch.stack((torch.tensor(10), y[1])))
    null = torch.full_like(y, 10)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat((x[:1], x[:1])), t, torch.stack((y[0], null[0])), cfg_scale=4.0)
        cond = model(x[:1], t[:1], y[:1])
        uncond = model(x[:1], t[1:], null[:1])
    torch.testing.assert_close(out[0, :3], uncond[0, :3] + 4.0 * (cond[0, :3] - uncond[0, :3]))
    torch.testing.assert_close(out[0, 3:], cond[0, 3:])
    torch.testing.assert_close(out[1, :3], out[0, :3])


def test_dit_configurations():
    with torch.device("meta"):
        xl = dit_xl_2()
        small = DIT_MODELS["DiT-S/8"](depth=1)
    # DiT-XL/2 as the official training script reports it
    assert sum(p.numel() for p in xl.parameters()) == 675_129_632
    attn = xl.blocks[0].attn
    assert (len(xl.blocks), attn.num_heads, attn.head_dim, tuple(xl.x_embedder.grid_size)) == (28, 16, 72, (16, 16))
    assert (len(small.blocks), small.x_embedder.patch_size, small.blocks[0].attn.head_dim) == (1, (8, 8), 64)
    assert len(DIT_MODELS) == 12
