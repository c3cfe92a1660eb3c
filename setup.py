from pathlib import Path

from setuptools import setup

requirements = [line.split("#")[0].strip() for line in Path("requirements.txt").read_text().splitlines()]
setup(
    name="capstf",
    version="0.1.0",
    description="CapsNets (Sabour, Frosst, Hinton 2017) on TensorFlow 2: train, evaluate, export, serve.",
    python_requires=">=3.11",
    packages=["capstf", "capstf.data", "capstf.model", "capstf.serving", "capstf.pipelines"],
    package_dir={"capstf.pipelines": "pipelines"},  # the recipes live at the top, installed inside
    package_data={"capstf.data": ["sample/*.gz"], "capstf.pipelines": ["*.toml", "bases/*.toml", "studies/*.toml"]},
    install_requires=[r for r in requirements if r],
    extras_require={"test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "cryptography==50.0.2",
                                "kubernetes-validate==1.37.0", "PyYAML==6.0.4"]},
    entry_points={"console_scripts": ["capstf=capstf.cli:main"]},
)
