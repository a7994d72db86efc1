"""Rollouts: vLLM workers that turn prompts into Samples (vllm_engine), multi-turn episodes played
against batched engine turns (episodes; the environment protocol in environment, one episode's token-level
loop in episode_loop), Ray actor groups with weight sync and crash recovery (group),
and the vLLM worker extension that loads weight buckets (weight_loader; the bucket format is
`mispo.weights.transport`)."""
