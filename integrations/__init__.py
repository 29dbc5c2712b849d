"""Adapters of VisualRWKV to external evaluation harnesses (plain Python, outside the nbdev-exported `visualrwkv`).

- `lm_eval_visualrwkv`: EleutherAI lm-evaluation-harness, text only (`pip install -e ".[lmeval]"`).
- `lmms_eval_visualrwkv`: lmms-eval, images and text (`pip install -e ".[lmms]"`).

Each module imports its harness at the top, so importing this package alone needs neither.
"""


def lmms_eval_manifest():
    "The `lmms_eval.models` entry point (setup.py): lmms-eval finds `--model visualrwkv` through it, lazily."
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="visualrwkv", simple_class_path="visualrwkv_integrations.lmms_eval_visualrwkv.VisualRWKVLMMS")
