"""Accuracy recovery for patched models (METHODS.md §10) and the CIFAR-10 reference-model recipe.

- :func:`distill`: attention transfer, then fine-tuning with logit distillation (``visionfx distill``).
- :mod:`~visionfx.recovery.data`: archives decoded once to uint8 tensors, augmentation on the device.
- :mod:`~visionfx.recovery.train`: a ViT trained from scratch on CIFAR-10 (``visionfx train cifar10``).
"""

from visionfx.recovery.config import DistillConfig, load_distill_config
from visionfx.recovery.data import GpuAugment, ImageData, load_image_data, tensor_data
from visionfx.recovery.distill import DistillResult, distill, load_distilled

__all__ = ["distill", "DistillConfig", "DistillResult", "load_distill_config", "load_distilled", "ImageData",
           "load_image_data", "tensor_data", "GpuAugment"]
