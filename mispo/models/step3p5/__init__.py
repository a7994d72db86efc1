"""Step 3.5 Flash (model_type `step3p5`): config, model, MoE helpers; registered with the Auto classes.

transformers maps `step3p5` to its own Step3p7 text config, so ours is registered with exist_ok=True.
vLLM registers its own `Step3p5Config` under the same model_type whenever it loads a step3p5 checkpoint;
`register_auto_classes` maps that class to mispo's models as well (they re-read config.json with ours).
`import mispo` alone is enough: `mispo/auto_registration.py` imports this package when transformers'
Auto classes (or vLLM's config class) are imported.
"""

import sys

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from mispo.auto_registration import VLLM_CONFIG_MODULE

from .backends import register_attention_backend, register_experts_backend
from .configuration_step3p5 import ConfigError, Step3p5Config
from .layout import SequenceLayout
from .modeling_step3p5 import Step3p5ForCausalLM, Step3p5Model


def register_auto_classes() -> None:
    """AutoConfig: step3p5 -> mispo's Step3p5Config. AutoModel / AutoModelForCausalLM: mispo's models for
    our config and, once vLLM's config module is imported, for vLLM's Step3p5Config too. Idempotent."""
    AutoConfig.register("step3p5", Step3p5Config, exist_ok=True)
    config_classes = [Step3p5Config]
    vllm_configs = sys.modules.get(VLLM_CONFIG_MODULE)
    if vllm_configs is not None and hasattr(vllm_configs, "Step3p5Config"):
        config_classes.append(vllm_configs.Step3p5Config)
    for config_class in config_classes:
        AutoModel.register(config_class, Step3p5Model, exist_ok=True)
        AutoModelForCausalLM.register(config_class, Step3p5ForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "ConfigError",
    "SequenceLayout",
    "Step3p5Config",
    "Step3p5ForCausalLM",
    "Step3p5Model",
    "register_attention_backend",
    "register_auto_classes",
    "register_experts_backend",
]
