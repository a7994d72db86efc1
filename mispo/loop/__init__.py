"""The RL loop: the driver (`trainer`), the processes it trains with (`roles`), the domains that give it
prompts and scores (`domains`), the pure math between forward and update (`prepare_update`), async mode's
staleness bound (`staleness`), DAPO's refills (`dynamic_sampling`), the guard that the engines serve the
learner's weights (`sync_guard`), what it says when a learner dies (`dead_actor`), and what it writes as it
goes (`metrics_log`, `progress`)."""
