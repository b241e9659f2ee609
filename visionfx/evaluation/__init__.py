"""Evaluation of patched models: ImageNet classification (:mod:`.imagenet`) and LLaVA VQA (:mod:`.vqa`,
:mod:`.vqa_metrics`, :mod:`.easy_vqa`); the ``visionfx eval`` command lives in :mod:`.cli`.

Names are imported on first use, so importing the package (as the command line does) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_imagenet": "imagenet",
    "WnidImageFolder": "imagenet",
    "create_timm_model": "imagenet",
    "apply_method": "imagenet",
    "generate_answers": "vqa",
    "score_predictions": "vqa",
    "load_llava": "vqa",
    "read_questions": "vqa",
    "read_answers": "vqa",
    "normalize_answer": "vqa_metrics",
    "vqa_accuracy": "vqa_metrics",
    "exact_match": "vqa_metrics",
    "pope_parse": "vqa_metrics",
    "pope_metrics": "vqa_metrics",
    "convert_easy_vqa": "easy_vqa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
