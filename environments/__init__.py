"""Multi-turn environments: the episode protocol (base), tools, a tool-use environment, a code
environment, and the token-level episode driver (episode.run_episode). They score episodes with
rewards/ (the XML tool-call parser is rewards.toolcalls); rewards never import environments."""
