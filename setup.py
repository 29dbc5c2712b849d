"""Installs `visualrwkv` (exported from nbs/) and its Triton kernels (kernels/, as `visualrwkv_kernels`)."""
from configparser import ConfigParser
from setuptools import setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    license="Apache-2.0",
    url=cfg["git_url"],
    python_requires=f">={cfg['min_python']}",
    packages=["visualrwkv", "visualrwkv_kernels"],
    package_dir={"visualrwkv": "visualrwkv", "visualrwkv_kernels": "kernels"},
    package_data={"visualrwkv": ["*.txt"]},
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split()},
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
