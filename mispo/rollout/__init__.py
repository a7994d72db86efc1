"""Rollouts: vLLM workers that turn prompts into Samples (vllm_engine), Ray actor groups with weight
sync and crash recovery (group), and the vLLM worker extension that loads weight buckets (weight_loader)."""
