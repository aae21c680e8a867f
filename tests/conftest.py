import os
from pathlib import Path

import pytest
import torch

# Two cores: torch's default threading is erratic here, one thread is faster and repeatable.
torch.set_num_threads(1)
# Tiny models are built once into the checkout's own (git-ignored) cache, never into the user's.
os.environ.setdefault("COMFY_RFT_CACHE", str(Path(__file__).resolve().parent.parent / ".test-cache"))


@pytest.fixture
def sd15():
    from comfy_rft.backend import DiffusersBackend

    return DiffusersBackend.load("tiny-sd15", device="cpu")


@pytest.fixture
def sdxl():
    from comfy_rft.backend import DiffusersBackend

    return DiffusersBackend.load("tiny-sdxl", device="cpu")
