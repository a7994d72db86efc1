"""Model-independent tensor operations shared by the learner and mispo's own models."""
