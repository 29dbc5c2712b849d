"""Installs `visualrwkv` (exported from nbs/) and its Triton kernels (kernels/, as `visualrwkv_kernels`)."""
from configparser import ConfigParser
from setuptools import setup

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

# Optional integrations (integrations/ as `visualrwkv_integrations`): each extra is tested by scripts/test_extras.sh,
# pinned in constraints.txt (lmms and demo each need one pin of their own there: see its last section).
EXTRAS = {
    "lmeval": ["lm_eval>=0.4.13,<0.5"],                      # EleutherAI lm-evaluation-harness: --model visualrwkv
    "lmms": ["lmms_eval>=0.7.3,<0.8"],                       # lmms-eval: --model visualrwkv (entry point below)
    "demo": ["gradio>=6.31,<7", "gradio_client>=2.7,<3"],    # app/demo.py
}

setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    license="Apache-2.0",
    url=cfg["git_url"],
    python_requires=f">={cfg['min_python']}",
    packages=["visualrwkv", "visualrwkv_kernels", "visualrwkv_integrations"],
    package_dir={"visualrwkv": "visualrwkv", "visualrwkv_kernels": "kernels", "visualrwkv_integrations": "integrations"},
    package_data={"visualrwkv": ["*.txt"]},
    install_requires=cfg["requirements"].split(),
    extras_require={"dev": cfg["dev_requirements"].split(), **EXTRAS},
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
                  "console_scripts": ["visualrwkv = visualrwkv.cli:main",
                                      "visualrwkv-lm-eval = visualrwkv_integrations.lm_eval_visualrwkv:main"],
                  "lmms_eval.models": ["visualrwkv = visualrwkv_integrations:lmms_eval_manifest"]},
)
