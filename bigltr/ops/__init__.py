"""Custom tensor ops for bigltr.

maxnorm_      in-place MaxNorm projection of the rows of a 2-D weight (torch or Triton backend).
sgd_maxnorm_  one torch.optim.SGD step followed by maxnorm_, fused into one kernel on the Triton path.

`maxnorm_` is importable without triton installed: triton is imported only when the Triton path is taken.
"""
from bigltr.ops.maxnorm import maxnorm_, sgd_maxnorm_

__all__ = ["maxnorm_", "sgd_maxnorm_"]
