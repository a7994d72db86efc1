"""The environment protocol, for plugins written against this path: it lives in `mispo.rollout.environment`."""

from mispo.rollout.environment import Environment, StepResult

__all__ = ["Environment", "StepResult"]
