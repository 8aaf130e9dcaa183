from setuptools import find_packages, setup

setup(
    name="muse_torchrec",
    version="0.1.0",
    description="MUSE (multimodal lifelong user interest CTR model) on TorchRec",
    packages=find_packages(include=["muse_torchrec", "muse_torchrec.*"]),
    package_data={"muse_torchrec": ["configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=["torch", "torchrec", "pyarrow", "numpy", "pyyaml", "tqdm"],
    entry_points={"console_scripts": ["muse-torchrec=muse_torchrec.cli:entry"]},
)
