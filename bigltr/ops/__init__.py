"""Custom tensor ops for bigltr.

maxnorm_      in-place MaxNorm projection of the rows of a 2-D weight (torch or Triton backend).
maxnorm_clipped_  the same, returning the number of rows clipped (a device tensor).
sgd_maxnorm_  one torch.optim.SGD step followed by maxnorm_, fused into one kernel on the Triton path.
flat_row_sumsq, maxnorm_scales, flat_rows_scale_
              MaxNorm over flat 1-D slices of a weight (DeepSpeed ZeRO partitions): partial row sums of squares,
              the per-row factors from their all-reduced sum, and the in-place scaling of a slice.

`maxnorm_` is importable without triton installed: triton is imported only when the Triton path is taken.
"""
from bigltr.ops.maxnorm import (flat_row_sumsq, flat_rows_scale_, maxnorm_, maxnorm_clipped_, maxnorm_scales,
                                sgd_maxnorm_)

__all__ = ["maxnorm_", "maxnorm_clipped_", "sgd_maxnorm_", "flat_row_sumsq", "maxnorm_scales", "flat_rows_scale_"]
