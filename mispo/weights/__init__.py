"""Weights in motion and at rest: the bucket format learners and engines share (`transport`), learner -> engine
sync by broadcast (`broadcast`), release-format checkpoints as sync buckets and their compatibility
(`checkpoint_io`), and the run's atomic training checkpoints (`checkpoint_store`)."""
