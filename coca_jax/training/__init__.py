"""Training: the pure train step and its loss terms, the optimizer, checkpoints (orbax), warm
starts, preemption handling and the run's metrics log. `coca_jax/train.py` is the CLI on top."""
