"""attnlab: attention mechanisms for JAX, with reference, XLA and Pallas tiers."""

import pathlib

import setuptools

setuptools.setup(
    name="attnlab",
    version="0.1.0",
    description="Attention mechanisms for JAX: reference, XLA and Pallas kernels behind one API.",
    long_description=(pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["attnlab", "attnlab.*", "pallas_kernels",
                                               "pallas_kernels.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "chex",
        "absl-py",
        "ml-collections",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        "data": ["tensorflow-datasets", "array_record"],
        "gpu": ["jax[cuda13]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "dev": ["pytest", "pytest-xdist", "tensorflow-datasets", "array_record", "nbclient",
                "nbformat", "ipykernel"],
    },
)
