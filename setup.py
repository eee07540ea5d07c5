"""Package metadata for hcd: Heterogeneous Complementary Distillation engine."""
from setuptools import find_packages, setup

# torch: a range for users; on the project's machines pip resolves it to the 2.14.1 wheel on disk.
# torchvision is pinned alongside because timm imports it and the pair must match.
INSTALL_REQUIRES = [
    "torch>=2.4,<2.15",
    "torchvision>=0.19,<0.30",
    "timm>=1.0.9",
    "triton>=3.0; platform_system == 'Linux'",
    "deepspeed>=0.15",
    "PyYAML>=6.0",
    "tqdm>=4.60",
    "tensorboard>=2.14",
    "safetensors>=0.4",
    "matplotlib>=3.7",
    "scikit-learn>=1.3",
    "numpy>=1.24",
    "pillow>=9.0",
]

# The repository keeps engine/ and kernels/ at its top level; they install as hcd.engine and hcd.kernels so
# that they never collide with other top-level packages of those names (Hugging Face's `kernels`).
PACKAGE_DIR = {"hcd.engine": "engine", "hcd.kernels": "kernels"}
PACKAGES = ["hcd"] + [f"hcd.{p}" for p in find_packages(include=["engine", "engine.*", "kernels", "kernels.*"])]

EXTRAS = {
    "dali": ["nvidia-dali-cuda120>=1.40"],
    "test": ["pytest>=7.4", "pytest-benchmark>=4.0"],
}
EXTRAS["dev"] = EXTRAS["dali"] + EXTRAS["test"]

setup(
    name="hcd",
    version="0.1.0",
    description="Heterogeneous Complementary Distillation: fused Triton losses and a DeepSpeed/DALI training engine",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["hcd=hcd.engine.cli:main"]},
)
