"""Step 3.5 Flash (model_type `step3p5`): config, model, MoE helpers; registered with the Auto classes.

transformers maps `step3p5` to its own Step3p7 text config; registering ours needs exist_ok=True.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .backends import register_attention_backend, register_experts_backend
from .configuration_step3p5 import ConfigError, Step3p5Config
from .layout import SequenceLayout
from .modeling_step3p5 import Step3p5ForCausalLM, Step3p5Model

AutoConfig.register("step3p5", Step3p5Config, exist_ok=True)
AutoModel.register(Step3p5Config, Step3p5Model, exist_ok=True)
AutoModelForCausalLM.register(Step3p5Config, Step3p5ForCausalLM, exist_ok=True)

__all__ = [
    "ConfigError",
    "SequenceLayout",
    "Step3p5Config",
    "Step3p5ForCausalLM",
    "Step3p5Model",
    "register_attention_backend",
    "register_experts_backend",
]
