"""Built-in reward plugins: rewards.math:score, rewards.code:score, rewards.tool:score,
rewards.preference (reward model and generative judge). See mispo.scoring.reward_runner for the contract.
Also the XML tool-call parser (rewards.toolcalls), shared with environments/. Environments import
rewards, never the other way round."""
