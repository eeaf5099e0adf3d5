from setuptools import setup

setup(
    name="fastmsd",
    version="0.1.0",
    description="Medical vision-language pretraining with momentum self-distillation, tuned for small GPUs",
    python_requires=">=3.10",
    packages=["fastmsd", "fastmsd.data", "fastmsd.data.synthcxr", "fastmsd.eval", "fastmsd.finetune",
              "fastmsd.kernels"],
    # kernels/ lives at the top of the repo and imports as fastmsd.kernels through the link
    # fastmsd/kernels; it has no __init__.py, so it never shadows the `kernels` distribution that
    # transformers imports (kernels/dispatch.py says why).
    package_data={"fastmsd.eval": ["prompts.yaml"], "fastmsd.data": ["label_prompts.yaml"]},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "timm>=1.0",
        # `fastmsd finetune --task segment` builds its U-Net and DPT decoders with it.
        "segmentation-models-pytorch>=0.6",
        "transformers>=4.46",
        "tokenizers",
        "safetensors",
        "numpy",
        "pillow",
        "pydicom>=3",
        # pydicom decodes JPEG Lossless (common in CR/DX archives), JPEG-LS, 12-bit JPEG and HTJ2K only
        # through these; Pillow alone covers 8-bit JPEG and JPEG 2000.
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.0",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # `kernels` (Hugging Face's): tests/test_import_names.py proves our kernels/ folder never
        # shadows it, whether or not transformers happens to depend on it.
        "dev": ["pytest", "ruff", "pytest-benchmark", "pydicom-data", "open-clip-torch", "scikit-learn",
                "kernels"],
        "dali": ["nvidia-dali-cuda120"],
    },
    entry_points={"console_scripts": ["fastmsd=fastmsd.cli:main"]},
)
