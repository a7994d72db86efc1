"""Built-in reward plugins: rewards.math:score, rewards.code:score, rewards.tool:score,
rewards.preference (reward model and generative judge). See mispo.reward_runner for the contract."""
