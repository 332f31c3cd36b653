"""Install fleetlm.

The Paddle build is a dependency too. The CPU build (``paddlepaddle``) is the default; on GPU
machines install ``paddlepaddle-gpu`` first and set ``FLEETLM_PADDLE_PACKAGE=paddlepaddle-gpu``
so that pip does not pull the CPU build next to it (both provide the ``paddle`` module).
"""

import os

from setuptools import find_packages, setup

# Checked with Paddle 3.3.1; fleetlm/parallel/cpu_compat/ patches private modules of that release.
PADDLE_VERSION = ">=3.3.1,<3.4"
paddle_package = os.environ.get("FLEETLM_PADDLE_PACKAGE", "paddlepaddle")
paddle_requirement = [] if paddle_package == "none" else [paddle_package + PADDLE_VERSION]

setup(
    name="fleetlm",
    version="0.1.0",
    description="Launcher-driven LLM pretraining on PaddlePaddle's fleet engine",
    packages=find_packages(include=["fleetlm", "fleetlm.*"]),
    python_requires=">=3.9",
    install_requires=paddle_requirement
    + [
        "numpy",
        "sentencepiece",
        "tiktoken",
        "tokenizers",
        "tqdm",
        "zstandard",
        "safetensors",
    ],
    extras_require={
        # torch (CPU) and transformers are only the reference implementations of the parity tests.
        "test": ["pytest", "matplotlib", "torch==2.13.0", "transformers>=5.0"],
    },
)
