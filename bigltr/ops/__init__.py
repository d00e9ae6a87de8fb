"""Custom tensor ops for bigltr.

`maxnorm_` is importable without triton installed: triton is imported only when the Triton path is taken.
"""
from bigltr.ops.maxnorm import maxnorm_

__all__ = ["maxnorm_"]
