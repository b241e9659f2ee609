"""Model definitions visionfx ships for hosts that have no pip-installable package (DiT)."""

from visionfx.models.dit import DIT_MODELS, DiT

__all__ = ["DiT", "DIT_MODELS"]
