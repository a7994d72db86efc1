"""The episode driver, for code written against this path: it lives in `mispo.rollout.episode_loop`."""

from mispo.rollout.episode_loop import Episode, run_episode

__all__ = ["Episode", "run_episode"]
