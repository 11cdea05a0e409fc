"""Continual training of converted models: `train(TrainConfig(...))`, or `upcycle train` on the command line.

    from upcycle.train import TrainConfig, train
    result = train(TrainConfig(model="converted/", data=["corpus.txt"], out="run/", steps=1000, seq_len=2048))
    model = upcycle.load(result.model_dir)
"""

from upcycle.train.config import TrainConfig
from upcycle.train.loop import TrainingStopped, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingStopped", "train"]
