import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter (fp32 only); it must be chosen before kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (families.py) importable under importlib mode

# tiny models: one thread is faster than two on a 2-core machine (no oversubscription with the test runner)
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
