"""The two-stage trainer (trainer.py), its config (config.py), checkpoints and torchrun support."""
