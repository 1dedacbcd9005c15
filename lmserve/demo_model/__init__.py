"""The built-in demo model `lmserve-demo`: a Hugging Face model directory shipped inside the package.

Its README.md says what it is; tools/train_demo_model.py made every file here.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "lmserve-demo"


def model_dir() -> Path:
    """The directory to hand to an engine or to `from_pretrained`."""
    return Path(__file__).resolve().parent
