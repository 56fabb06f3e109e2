"""megatron-delta: Delta Attention Residuals for Megatron-Core GPT models."""

from setuptools import find_packages, setup

setup(
    name="megatron-delta",
    version="0.1.0",
    description="Delta Attention Residuals (depth routing) for Megatron-Core GPT models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_delta", "megatron_delta.*"]),
    install_requires=[
        # A lower bound only: a container's own torch (the build Transformer Engine was compiled
        # against) must never be replaced. The README's set-up command pins the CPU wheel.
        "torch>=2.6",
        # 0.16.1 (Python 3.10/3.11) through 0.19.x (Python 3.12+); megatron_delta/compat.py holds
        # every difference between them.
        "megatron-core>=0.16.1,<0.20",
        "pyyaml",
        "nltk",
        "numpy",
        "psutil",  # dist_checkpointing's save path needs it
        "safetensors",
        "tensorboard",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # triton: kernel tests in its CPU interpreter (and imported by Megatron-LM's training code);
        # six, pybind11: Megatron-LM's own requirements (tokenizers, its dataset-helper build) for
        # tests/test_megatron_lm.py with MEGATRON_LM_PATH set; lm_eval: lm-evaluation-harness on an
        # exported directory (tests/test_generate.py).
        "test": ["pytest", "transformers", "triton", "six", "pybind11", "lm_eval[hf]"],
        # Transformer Engine for the TE spec and FP8. NVIDIA Apex is NOT on PyPI
        # (the PyPI package named `apex` is unrelated): build it from NVIDIA's source.
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-delta=megatron_delta.cli:main"]},
)
