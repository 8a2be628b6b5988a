"""Inference: the SVI engine, checkpoints and the held-out IWELBO."""

from .engine import TrainConfig, TrainingDivergedError, resolve_device, train
from .iwelbo import iwelbo, log_weights

__all__ = ["TrainConfig", "TrainingDivergedError", "iwelbo", "log_weights", "resolve_device", "train"]
