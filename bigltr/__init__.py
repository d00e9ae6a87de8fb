"""bigltr: long-tailed recognition via weight balancing (Alshammari et al., CVPR 2022), as a distributed trainer.

Data flow: bigltr.data (shards) -> bigltr.models -> bigltr.objective (losses, MaxNorm) -> bigltr.engine (stages)
-> bigltr.checkpoint -> bigltr.metrics / bigltr.plots. Entry point: bigltr.train.
"""
__version__ = "0.1.0"
