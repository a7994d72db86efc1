"""Rewards: user reward plugins loaded and checked from the recipe (`plugins`), and run concurrently with
time limits, sandboxing and failure accounting (`reward_runner`). The built-in plugins live in the top-level
`rewards/` and `environments/` folders, where recipes name them."""
