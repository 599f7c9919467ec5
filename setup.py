from setuptools import find_packages, setup

setup(
    name="latent-diffusion-lab",
    version="0.1.0",
    description="Latent diffusion (Stable Diffusion's system) to train, sample and ablate: KL-VAE + text-conditioned UNet.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # configs/ at the top level is the one source; the wheel carries it as ldm/configs (found by name:
    # --config demo/diffusion), and the demo weights as ldm/assets
    packages=find_packages(include=["ldm", "ldm.*", "autoencoder", "autoencoder.*"]) + ["ldm.configs"],
    package_dir={"ldm.configs": "configs"},
    package_data={"ldm": ["assets/*.safetensors", "assets/*.json"], "ldm.configs": ["*.yaml", "*/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "open_clip_torch>=2.20",
        "einops>=0.6",
        "lpips>=0.1.4",
        "pytorch-lightning>=2.0",
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "torchmetrics>=1.0",
        "webdataset>=0.2.80",
        "pillow>=9.0",
        "numpy>=1.23",
    ],
    extras_require={
        # wandb: the W&B logger's offline test runs in CI too; tensorboard: its image logging
        "test": ["pytest>=7", "pytest-timeout>=2", "scikit-image>=0.20", "psutil>=5", "matplotlib>=3.5", "wandb>=0.16",
                 "tensorboard>=2.10", "torch-fidelity>=0.3"],
        "gpu": ["xformers>=0.0.23"],
        "bench": ["diffusers>=0.30", "psutil>=5"],
        # checkpoint interop with diffusers folders and HF CLIP text encoders; the core never needs them
        "diffusers": ["diffusers>=0.30", "transformers>=4.40"],
        "plots": ["matplotlib>=3.5"],
        # FID/KID with the Inception network (torchmetrics loads it through torch-fidelity)
        "eval": ["torch-fidelity>=0.3"],
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.16"],
    },
    entry_points={"console_scripts": ["ldm=ldm.cli:main"]},
)
