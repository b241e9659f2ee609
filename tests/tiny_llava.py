"""Tiny random LLaVA and LLaVA-NeXT built from configs (MLLM.md §7.1), and hand-built left-padded prompts.

Shared by the visual-token method tests (fastervlm, dyvte, var). Nothing is downloaded.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = 199
PAD, BOS, EOS = 0, 1, 2
NUM_PATCHES = 16  # 32 px images, 8 px patches: a 4x4 grid per crop
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _sub_configs(vision_layers: int = 4, text_layers: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=200, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                       max_position_embeddings=256)
    return vision, text


def _finish(model, attn_implementation):
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def build_llava(seed: int = 0, attn_implementation: str | None = None, text_layers: int = 4, **overrides):
    """A tiny ``LlavaForConditionalGeneration`` in eval mode, fp32, CPU (16 image tokens per image)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = _sub_configs(text_layers=text_layers)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                         image_seq_length=NUM_PATCHES, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", **overrides)
    config.pad_token_id = PAD
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration(config), attn_implementation)


def build_llava_next(seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A tiny ``LlavaNextForConditionalGeneration`` (anyres pinpoints up to 64x64: at most 5 crops per image)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision, text = _sub_configs()
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", **overrides)
    config.pad_token_id = PAD
    torch.manual_seed(seed)
    return _finish(LlavaNextForConditionalGeneration(config), attn_implementation)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``(input_ids [B, L], attention_mask [B, L])`` left padded with PAD."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def prompt(pre: list[int], post: list[int], image_tokens: int | list[int] = NUM_PATCHES) -> list[int]:
    """``[BOS] + pre + [image]*n + post``; a list of counts writes several images, each followed by ``post``."""
    counts = [image_tokens] if isinstance(image_tokens, int) else image_tokens
    out = [BOS] + list(pre)
    for n in counts:
        out += [IMAGE_TOKEN] * n + list(post)
    return out


def llava_batch(texts: list[tuple[list[int], list[int]]], images_per_row: list[int] | None = None, seed: int = 1):
    """A left-padded LLaVA batch: row b is ``prompt(pre_b, post_b)`` with ``images_per_row[b]`` images (default 1);
    ``pixel_values [sum(images), 3, 32, 32]`` in reading order."""
    images_per_row = images_per_row or [1] * len(texts)
    rows = [prompt(pre, post, [NUM_PATCHES] * k) for (pre, post), k in zip(texts, images_per_row)]
    ids, mask = left_pad(rows)
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(sum(images_per_row), 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}


def llava_next_tokens(height: int, width: int) -> int:
    """Placeholder count of one LLaVA-NeXT image, computed by the HF processor's own formula."""
    from types import SimpleNamespace

    from transformers import LlavaNextProcessor

    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=PINPOINTS), patch_size=8,
                           num_additional_image_tokens=0)
    fake._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(fake, *a)
    return LlavaNextProcessor._get_number_of_features(fake, height, width, 32, 32)


def llava_next_batch(model, texts: list[tuple[list[int], list[int]]], sizes: list[tuple[int, int]], seed: int = 2):
    """A left-padded LLaVA-NeXT batch, one image per row of original size ``sizes[b]`` (H, W):
    ``pixel_values [B, P_max, 3, 32, 32]`` (zero padded crops), ``image_sizes [B, 2]``."""
    from visionfx.patches.llava import LlavaParts

    crops = LlavaParts.of(model).crops_per_image(sizes)
    rows = [prompt(pre, post, llava_next_tokens(*hw)) for (pre, post), hw in zip(texts, sizes)]
    ids, mask = left_pad(rows)
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(len(sizes), max(crops), 3, 32, 32)
    for b, c in enumerate(crops):
        pixel_values[b, :c] = torch.randn(c, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def select(batch: dict, row: int, images_per_row: list[int] | None = None) -> dict:
    """One row of a batch as its own unpadded batch of 1 (its images only)."""
    mask = batch["attention_mask"][row]
    keep = mask.bool()
    out = {"input_ids": batch["input_ids"][row][keep][None], "attention_mask": mask[keep][None]}
    if "image_sizes" in batch:
        out["pixel_values"] = batch["pixel_values"][row:row + 1]
        out["image_sizes"] = batch["image_sizes"][row:row + 1]
    else:
        counts = images_per_row or [1] * batch["input_ids"].shape[0]
        start = sum(counts[:row])
        out["pixel_values"] = batch["pixel_values"][start:start + counts[row]]
    return out


def greedy(model, batch: dict, new_tokens: int = 8, **kwargs):
    """Greedy ``generate`` of ``new_tokens`` tokens (no early stop), returning the output object with scores."""
    return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          return_dict_in_generate=True, output_scores=True, pad_token_id=PAD, **kwargs)


def count_host_syncs(monkeypatch, *modules) -> list[str]:
    """Record, by function name, every tensor-to-host read (``tolist``, ``item``, ``bool``/``int``/``float``,
    ``nonzero``: each waits for the device) made directly by code in ``modules``; undone by ``monkeypatch``."""
    import sys

    files = {m.__file__ for m in modules}

    calls: list[str] = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename in files:
                calls.append(caller.co_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls
