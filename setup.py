"""Build and install distseq; compiles ``csrc/`` into ``distseq._C`` when torch is importable.

Build with ``pip install --no-build-isolation -e .`` after installing torch: an isolated build
would download a (multi-GB CUDA) torch only to compile against it. Without torch at build time
the package installs without ``distseq._C`` and falls back to torch ops.
The CUDA kernel is compiled only where torch has CUDA and ``nvcc`` is found
(``DISTSEQ_BUILD_CUDA=0`` turns it off).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

TORCH_PIN = "torch==2.13.0"
HF = ["transformers>=5.20,<6", "safetensors>=0.4"]


def _extensions() -> tuple[list, dict]:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("distseq: torch not importable at build time; skipping distseq._C", file=sys.stderr)
        return [], {}
    sources = ["csrc/lse_merge.cpp"]
    flags = {"cxx": ["-O3", "-std=c++17"]}
    extension = cpp_extension.CppExtension
    want_cuda = os.environ.get("DISTSEQ_BUILD_CUDA", "1") != "0"
    if want_cuda and torch.version.cuda and cpp_extension.CUDA_HOME:
        sources.append("csrc/lse_merge_cuda.cu")
        flags["cxx"].append("-DDISTSEQ_WITH_CUDA")
        flags["nvcc"] = ["-O3", "-std=c++17", "-DDISTSEQ_WITH_CUDA"]
        extension = cpp_extension.CUDAExtension
    module = extension("distseq._C", sources, include_dirs=["csrc"], extra_compile_args=flags)
    return [module], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="distseq",
    version="0.1.0",
    description="Exact sequence-parallel attention and linear attention for long-context training",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distseq", "distseq.*"]),
    package_data={"distseq.planner": ["profiles/*.json", "fixtures/*.csv"]},
    install_requires=[
        TORCH_PIN,
        "numpy",
        "scipy",
        "matplotlib",
        "omegaconf>=2.3",
        "pyyaml",
        "rich",
        "tqdm",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.7", "triton"],
        # DS_BUILD_OPS=0 at install: its ops compile on first use instead.
        "deepspeed": ["deepspeed==0.19.8"],
        # Hugging Face models (distseq.hf, model.hf in training configs).
        "hf": HF,
        # Hugging Face datasets on disk / .parquet inputs of `python -m distseq.data prepare`.
        "data": ["pyarrow"],
        "dev": ["pytest", "hypothesis", "ruff", "triton", "deepspeed==0.19.8", *HF, "pyarrow"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
