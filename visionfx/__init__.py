"""visionfx: efficient token mixers and visual-token methods, patched into the models you already have.

    import timm, visionfx
    model = timm.create_model("deit_small_patch16_224")
    visionfx.patch(model, "agent")     # every softmax attention -> agent attention, qkv/proj weights kept
    visionfx.explain(model)            # per layer: method, kernel backend, parameters added
    visionfx.unpatch(model)            # exactly the original model again
"""

__version__ = "0.1.0"

from visionfx.config import load_config
from visionfx.io import load_pretrained, save_pretrained
from visionfx.methods.prepbn import recalibrate_bn, reparameterize
from visionfx.patching import explain, get_config, is_patched, patch, unpatch
from visionfx.registry import list_methods

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "list_methods",
    "get_config",
    "load_config",
    "save_pretrained",
    "load_pretrained",
    "explain",
    "reparameterize",
    "recalibrate_bn",
    "distill",
    "__version__",
]


def __getattr__(name):
    # the recovery stack (accelerate, data pipelines) loads only when asked for
    if name == "distill":
        from visionfx.recovery import distill

        return distill
    raise AttributeError(f"module 'visionfx' has no attribute {name!r}")
