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
    package_data={"megatron_delta": ["configs/*.yaml"]},
    install_requires=[
        # 2.13.0 is the CPU wheel on the project's machines; any CUDA build of 2.13 works on GPUs.
        "torch==2.13.0",
        # 0.16.1 is the newest megatron-core that ships Python 3.11 wheels (0.17+ are cp312 only).
        "megatron-core>=0.16.1,<0.17",
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
        # tests/test_megatron_lm.py with MEGATRON_LM_PATH set.
        "test": ["pytest", "transformers", "triton", "six", "pybind11"],
        # Transformer Engine for the TE spec and FP8. NVIDIA Apex is NOT on PyPI
        # (the PyPI package named `apex` is unrelated): build it from NVIDIA's source.
        "te": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-delta=megatron_delta.cli:main"]},
)
