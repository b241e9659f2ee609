"""easy-VQA for the tiny LLaVA recipe: a word-level tokenizer built from the data, the LLaVA processor, prompts, and
the splits decoded once into tensors on the device, augmented there.

easy-VQA (``easy-vqa/{train,test}/images/<id>.png``, 64×64 RGB; ``{split}/questions.json`` = list of ``[question,
answer, image_id]``; 13 answers) is read from the archive or an extracted folder. Each split's images are decoded
**once** into ``uint8 [N_images, 3, 64, 64]`` and every prompt is tokenised once into left-padded ``int64 [N, L]``;
batches are index gathers on the device, so the accelerator is the bottleneck.

Prompt (also the processor's chat template, so ``visionfx eval vqa --prompt auto`` builds the same text)::

    USER: <image>\\n{question}{suffix} ASSISTANT: {answer}</s>

with ``suffix`` LLaVA's short-answer instruction by default (``visionfx.evaluation.easy_vqa`` appends the same one to
the questions it converts). The processor expands ``<image>`` into 64 placeholders (8×8 patches; the CLS feature is
dropped by the ``"default"`` select strategy) and the tokenizer prepends ``<s>``.

Decisions the specs leave open:

- **Tokenizer.** ``tokenizers`` WordLevel model wrapped in ``PreTrainedTokenizerFast``: lower-casing normaliser,
  ``Whitespace`` pre-tokeniser (``\\w+`` runs and punctuation runs are words), special tokens ``<pad>`` (0), ``<s>``
  (1), ``</s>`` (2), ``<unk>`` (3), ``<image>`` (4), then the words of the questions, answers, template and suffix
  of the training split in sorted order. Unknown words map to ``<unk>``. Decoding joins words with spaces.
- **Image normalisation** ``(x / 255 − 0.5) / 0.5`` per channel (the processor's ``image_mean`` / ``image_std``), so
  the processor's pixel values equal the on-device ones.
- **Augmentation.** Colours and shapes are the answers, so there is no colour jitter, no crop that could cut the
  shape off and no zero padding (black is an answer): a random translation of up to ``translate`` pixels, the
  uncovered border filled with the background colour (the per-channel median of the four corner pixels), and an
  optional horizontal flip (no question is about left or right, and a mirrored
  circle, rectangle or upright triangle is the same shape).
- Training sequences are ``prompt + answer + </s>`` left padded to the split's longest, so the answer and ``</s>``
  are the last two positions of every row; the loss reads only the logits that predict them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["SPECIALS", "PAD", "BOS", "EOS", "UNK", "IMAGE", "CHAT_TEMPLATE", "IMAGE_MEAN", "IMAGE_STD", "VqaSplit",
           "EasyVQA", "read_easy_vqa", "build_tokenizer", "build_processor", "format_prompt", "VqaAugment",
           "normalize_images"]

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD, BOS, EOS, UNK, IMAGE = range(5)
USER, ASSISTANT = "USER:", "ASSISTANT:"
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
SPLITS = ("train", "test")

# The processor's chat template writes exactly format_prompt's text (tests check this).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def format_prompt(question: str, suffix: str = "", image: str = "<image>") -> str:
    """The prompt text (one ``<image>``, before the processor's expansion) for ``question``."""
    return f"{USER} {image}\n{question}{suffix} {ASSISTANT}"


# --- reading -------------------------------------------------------------------------------------------------------


@dataclass
class _RawSplit:
    questions: list[str]
    answers: list[str]
    image_ids: list[int]
    images: dict[int, bytes]  # id -> PNG bytes


def read_easy_vqa(source: str | os.PathLike, splits=SPLITS, limit: int | None = None) -> dict[str, _RawSplit]:
    """Questions and the PNG bytes of the images they use, per split, from the archive or an extracted folder.

    ``limit`` keeps the first N questions of each split (and only their images)."""
    source = Path(source)
    if source.is_file():
        files: dict[str, bytes] = {}
        with tarfile.open(source, "r:*") as tar:
            for m in tar:  # one sequential pass: seeking backwards in a compressed stream re-decompresses it
                if m.isfile() and any(f"{s}/" in m.name for s in splits):
                    files[m.name] = tar.extractfile(m).read()
        root = next((n[:-len(f"{s}/questions.json")] for n in files for s in splits
                     if n.endswith(f"{s}/questions.json")), None)
        if root is None:
            raise FileNotFoundError(f"{source}: no easy-VQA data ({{train,test}}/questions.json) found")

        def read(name: str) -> bytes:
            if root + name not in files:
                raise FileNotFoundError(f"{source}: {root + name} is missing")
            return files[root + name]

        return _collect(read, splits, limit)
    from visionfx.evaluation.easy_vqa import find_root

    folder = find_root(source)
    return _collect(lambda name: (folder / name).read_bytes(), splits, limit)


def _collect(read, splits, limit) -> dict[str, _RawSplit]:
    out = {}
    for split in splits:
        rows = json.loads(read(f"{split}/questions.json"))[:limit]
        ids = [int(r[2]) for r in rows]
        images = {i: read(f"{split}/images/{i}.png") for i in sorted(set(ids))}
        out[split] = _RawSplit([r[0] for r in rows], [r[1] for r in rows], ids, images)
    return out


def _decode(png: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


# --- tokenizer and processor ---------------------------------------------------------------------------------------


def _words(texts) -> set[str]:
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    return {w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))}


def build_tokenizer(texts, image_seq_length: int | None = None):
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is :data:`SPECIALS` then the sorted words of
    ``texts`` (questions, answers, template, suffix); left padding, ``<s>`` prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(_words(list(texts) + [USER, ASSISTANT]) - set(SPECIALS))
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no word carries the prefix: a plain space join
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", model_max_length=1024)
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if fast.convert_tokens_to_ids("<image>") != IMAGE or fast.pad_token_id != PAD:
        raise RuntimeError("special token ids moved; the vocabulary layout is broken")
    return fast


def build_processor(tokenizer, image_size: int, patch_size: int):
    """``LlavaProcessor`` (``CLIPImageProcessor`` at ``image_size``, the chat template, ``"default"`` selection)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          image_token="<image>", num_additional_image_tokens=1)


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> ``float32 [B, 3, H, W]`` exactly as the processor normalises."""
    mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# --- tensors -------------------------------------------------------------------------------------------------------


@dataclass
class VqaSplit:
    """One split as tensors: ``images uint8 [M, 3, H, W]``; per question ``image [N]`` (row of ``images``),
    ``input_ids``/``attention_mask`` ``[N, L]`` left padded (prompt, plus answer and ``</s>`` when built with
    answers), ``answer_ids [N]``; ``questions``, ``answers`` and ``categories`` as strings."""

    images: torch.Tensor
    image: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor
    questions: list[str]
    answers: list[str]
    categories: list[str]
    with_answers: bool

    def __len__(self) -> int:
        return self.image.shape[0]

    def to(self, device) -> "VqaSplit":
        for name in ("images", "image", "input_ids", "attention_mask", "answer_ids"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx``: ``input_ids``, ``attention_mask``, ``images`` (uint8), ``answer_ids``."""
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "images": self.images[self.image[idx]], "answer_ids": self.answer_ids[idx]}


def _encode(tokenizer, raw: _RawSplit, suffix: str, image_tokens: int, with_answers: bool) -> VqaSplit:
    from visionfx.evaluation.easy_vqa import category_of

    ids = sorted(raw.images)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = torch.stack(list(pool.map(_decode, (raw.images[i] for i in ids))))
    row = {i: r for r, i in enumerate(ids)}
    texts = [format_prompt(q, suffix) + (f" {a}" if with_answers else "") for q, a in zip(raw.questions, raw.answers)]
    # few distinct texts: tokenise each once, then expand its single <image> into the placeholder run
    unique = sorted(set(texts))
    expanded = {}
    for text, ids in zip(unique, tokenizer(unique, add_special_tokens=True)["input_ids"]):
        k = ids.index(IMAGE)
        expanded[text] = ids[:k] + [IMAGE] * image_tokens + ids[k + 1:] + ([EOS] if with_answers else [])
    width = max(len(r) for r in expanded.values())
    table = torch.full((len(unique), width), PAD, dtype=torch.long)
    table_mask = torch.zeros((len(unique), width), dtype=torch.long)
    for u, text in enumerate(unique):
        r = expanded[text]
        table[u, width - len(r):] = torch.tensor(r)
        table_mask[u, width - len(r):] = 1
    which = {t: u for u, t in enumerate(unique)}
    index = torch.tensor([which[t] for t in texts], dtype=torch.long)
    input_ids, mask = table[index], table_mask[index]
    answer_ids = [tokenizer.convert_tokens_to_ids(a.lower()) for a in raw.answers]
    return VqaSplit(images=images, image=torch.tensor([row[i] for i in raw.image_ids], dtype=torch.long),
                    input_ids=input_ids, attention_mask=mask, answer_ids=torch.tensor(answer_ids, dtype=torch.long),
                    questions=list(raw.questions), answers=list(raw.answers),
                    categories=[category_of(a) for a in raw.answers], with_answers=with_answers)


class EasyVQA:
    """easy-VQA decoded once: ``train`` (prompts with answers) and ``test`` (prompts only) :class:`VqaSplit`, the
    tokenizer built from the training split, and ``suffix``/``image_tokens`` the prompts were built with."""

    def __init__(self, source: str | os.PathLike, *, suffix: str | None = None, image_tokens: int = 64,
                 limit: int | None = None, tokenizer=None):
        from visionfx.evaluation.vqa import SHORT_ANSWER

        self.suffix = SHORT_ANSWER if suffix is None else suffix
        self.image_tokens = int(image_tokens)
        raw = read_easy_vqa(source, SPLITS, limit)
        tr = raw["train"]
        self.tokenizer = tokenizer or build_tokenizer(tr.questions + tr.answers + [self.suffix])
        self.train = _encode(self.tokenizer, tr, self.suffix, self.image_tokens, with_answers=True)
        self.test = _encode(self.tokenizer, raw["test"], self.suffix, self.image_tokens, with_answers=False)

    def to(self, device) -> "EasyVQA":
        self.train.to(device)
        self.test.to(device)
        return self


# --- augmentation --------------------------------------------------------------------------------------------------


class VqaAugment:
    """On-device augmentation that keeps the answers true: ``uint8 [B, 3, H, W]`` -> normalised ``float32``.

    A random shift of up to ``translate`` pixels per axis, the uncovered border filled with the background colour
    (per-channel median of the four corners), then (``flip``) a horizontal flip with probability 1/2. Random choices
    are a function of ``(seed, step)`` only."""

    def __init__(self, translate: int = 4, flip: bool = True, seed: int = 0):
        if translate < 0:
            raise ValueError(f"translate must be >= 0, got {translate}")
        self.translate, self.flip, self.seed = int(translate), bool(flip), int(seed)

    def __call__(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + step)
        x = normalize_images(x)
        B, _, H, W = x.shape
        if self.translate:
            t = self.translate
            # the background is one colour: fill with it (replicated edges would stretch a shape that touches them)
            corners = x[:, :, [0, 0, H - 1, H - 1], [0, W - 1, 0, W - 1]]  # [B, 3, 4]
            fill = corners.median(-1).values[:, :, None, None]
            padded = fill.expand(B, 3, H + 2 * t, W + 2 * t).clone()
            padded[:, :, t:t + H, t:t + W] = x
            dy = torch.randint(0, 2 * t + 1, (B,), generator=g, device=x.device)
            dx = torch.randint(0, 2 * t + 1, (B,), generator=g, device=x.device)
            rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [B, H, 1]
            cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [B, 1, W]
            b = torch.arange(B, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2).contiguous()
        if self.flip:
            flip = torch.rand(B, generator=g, device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return x
