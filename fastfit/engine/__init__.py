"""The training engine: one loop for every entry point — setup, stage runner and step, evaluation, checkpoints,
metrics, preemption and non-finite handling. It builds on data, distill and models, and never imports perf or demo.

    from fastfit.engine import train
    summary = train(load_config("fitnets_r50_r18_in1k", ["data.root=/data/imagenet"]))
"""

from fastfit.engine.loop import train

__all__ = ["train"]
