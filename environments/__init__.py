"""Multi-turn environments: the episode protocol (base), XML tool calls, tools, a tool-use
environment, a code environment, and the token-level episode driver (episode.run_episode)."""
