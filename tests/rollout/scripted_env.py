"""A scripted multi-turn environment for the rollout tests (loaded by the workers by file path)."""

from mispo.rollout.environment import StepResult


class Countdown:
    """Answers each model turn with `obs<k>`; ends the episode after 3 model turns, reward 3.0."""

    def reset(self, row):
        self.turns = 0
        return f"count {row['question']}"

    def step(self, text, token_ids):
        self.turns += 1
        if self.turns >= 3:
            return StepResult.finish(3.0, turns_seen=self.turns)
        return StepResult(observation=f"obs{self.turns}")

    def unfinished_reward(self, reason):
        return -1.0
