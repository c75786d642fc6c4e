"""Build entry for spanet and spanet_ops.

The native extension is built from ``csrc/`` by CMake (see CMakeLists.txt).
"""
from setuptools import find_packages, setup

setup(
    name="spanet",
    version="0.1.0",
    description="SPANet (ICCV 2023) with fast, exact spectral token-mixer operators",
    packages=find_packages(include=["spanet", "spanet.*", "spanet_ops", "spanet_ops.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "timm>=1.0"],
)
