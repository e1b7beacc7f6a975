"""mixmae-jax: MixMIM/MixMAE pretraining of hierarchical vision transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mixmae-jax",
    version="0.1.0",
    description="Masked image modelling (MixMIM/MixMAE) for Swin-style models in JAX/Flax, "
    "with exact conversion to the official PyTorch checkpoints.",
    packages=find_packages(include=["mixmae_jax", "mixmae_jax.*"]),
    package_data={"mixmae_jax.train": ["gpu_specs/*.txtpb"]},  # GPU targets of --topology
    python_requires=">=3.11",
    # Versions are pinned in requirements.txt (the tested set); these are the direct needs.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "clu",
        "tensorflow-datasets",
        "numpy",
        "pillow",
        "scikit-image",
    ],
    extras_require={
        "torch": ["torch==2.13.0"],
        # mixmae-bench --topology on a machine without the accelerator (requirements-accelerators)
        "aot": ["libtpu==0.0.42.1", "jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "mixmae-pretrain=mixmae_jax.cli:pretrain_main",
            "mixmae-finetune=mixmae_jax.cli:finetune_main",
            "mixmae-convert=mixmae_jax.cli:convert_main",
            "mixmae-visualize=mixmae_jax.cli:visualize_main",
            "mixmae-bench=mixmae_jax.cli:bench_main",
            "mixmae-eval=mixmae_jax.cli:eval_main",
        ]
    },
)
