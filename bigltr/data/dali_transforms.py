"""The DALI graph of the augmentations: encoded images -> normalised float CHW, as ``transforms.build_transform``
does for the torch reader. DALI is imported when a graph is built, so this module imports without it."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["augment_graph"]

# timm's DEFAULT_CROP_PCT: the eval transform resizes the shorter side to floor(img_size / 0.875), then centre-crops
_CROP_PCT = 0.875


def augment_graph(enc, *, aug: str, augment: bool, img_size, in_chans: int, mean: Sequence[float],
                  std: Sequence[float], gpu: bool):
    """Encoded images -> normalised float CHW, mirroring ``bigltr.data.transforms.build_transform``.

    Eval paths match torch's (up to decoder/resampler rounding, see docs/data.md): ``none``/``cifar``: resize to
    img_size x img_size when the image has another size; ``imagenet``: timm's eval transform, shorter side to
    floor(img_size / 0.875) (longer side int()-truncated like torchvision), centre crop with Python's
    round-half-even offset. ``img_size``: S, [S] or [H, W] (``bigltr.data.transforms.image_hw``; a non-square size
    resizes to H x W and crops H x W; ``imagenet`` eval needs a square one). Training: ``cifar`` pads 4 (zeros) and
    takes a random img_size crop (``crop``: the same, never flipped), then flips with
    p=0.5; ``imagenet`` is timm's default: random-resized crop (area 0.08-1, ratio 3/4-4/3, 10 attempts),
    flip, colour jitter 0.4 (brightness, contrast, saturation factors in [0.6, 1.4]).
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    from .transforms import image_hw

    H, W = image_hw(img_size)
    S = H  # the square sizes (imagenet eval) are S x S
    dec = dict(device="mixed" if gpu else "cpu", output_type=types.RGB,
               adjust_orientation=False,  # PIL ignores EXIF orientation; so does the torch path
               jpeg_fancy_upsampling=True)  # libjpeg's (and so PIL's) chroma upsampling on the GPU too
    lin = dict(interp_type=types.INTERP_LINEAR, antialias=True)  # torchvision's bilinear with antialias on PIL

    def mode(img):
        # in_chans 1: decode RGB, then convert with PIL's convert("L") weights (a GRAY decode of a colour JPEG
        # reads its luma channel instead: up to 4 grey levels off PIL)
        if in_chans == 1:
            return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
        return img

    mirror = 0
    if aug == "imagenet" and augment:
        img = mode(fn.decoders.image_random_crop(enc, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                 num_attempts=10, **dec))
        img = fn.resize(img, resize_x=W, resize_y=H, **lin)
        # ColorJitter(0.4, 0.4, 0.4) as one colour matrix (DALI's color_twist: a single pass, 1.5x faster on CPU
        # than brightness_contrast + saturation). torchvision applies the three in a random order, clamping after
        # each, and centres contrast on the image's mean grey; color_twist has a fixed order, clamps once and
        # centres contrast on mid-grey (128). Same factor distributions.
        jitter = dict(brightness=fn.random.uniform(range=[0.6, 1.4]), contrast=fn.random.uniform(range=[0.6, 1.4]))
        if in_chans == 3:
            img = fn.color_twist(img, saturation=fn.random.uniform(range=[0.6, 1.4]), **jitter)
        else:  # saturation does nothing to a grey image (nor in torchvision)
            img = fn.brightness_contrast(img, **jitter)
        mirror = fn.random.coin_flip(probability=0.5)
    elif aug == "imagenet":
        if H != W:  # timm resizes a non-square eval size with its ResizeKeepRatio, not mirrored here
            raise ValueError(f"the DALI pipeline's imagenet eval transform needs a square img_size, got {H}x{W} "
                             f"(use data.pipeline=torch)")
        shape = fn.peek_image_shape(enc, adjust_orientation=False, dtype=types.INT32)
        h, w = shape[0], shape[1]
        R = math.floor(S / _CROP_PCT)
        h_short = h <= w  # torchvision: the shorter side is w only when w < h
        tall = 1 - h_short
        new_long = (R * dmath.max(h, w)) // dmath.min(h, w)  # == int(R * long / short) for positive integers
        new_h, new_w = h_short * R + tall * new_long, h_short * new_long + tall * R  # w == h: both R
        img = mode(fn.decoders.image(enc, **dec))
        img = fn.resize(img, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                        **lin)
        img = fn.slice(img, fn.stack(_half_even(new_h - S), _half_even(new_w - S)), _const([S, S]), axes=[0, 1])
    else:
        if aug not in ("none", "cifar", "crop"):
            raise ValueError(f"aug must be 'none', 'cifar', 'crop' or 'imagenet', got {aug!r}")
        img = mode(fn.decoders.image(enc, **dec))
        # resize to S x S; DALI's linear resampling to the same size is the identity (tests check it), so the
        # torch path's "only when the size differs" needs no branch
        img = fn.resize(img, resize_x=W, resize_y=H, **lin)
        if aug in ("cifar", "crop") and augment:
            # RandomCrop(S, padding=4) on an S x S image: offset in {-4..4} per axis, zero padding
            off = fn.random.uniform(values=list(range(-4, 5)), shape=[2], dtype=types.INT32)
            img = fn.slice(img, off, _const([H, W]), axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
            if aug == "cifar":
                mirror = fn.random.coin_flip(probability=0.5)
    # ToTensor + Normalize: (x / 255 - m) / s == (x - 255 m) / (255 s)
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * float(m) for m in mean], std=[255.0 * float(s) for s in std])


def _const(values):
    from nvidia.dali import types

    return types.Constant(np.array(values, dtype=np.int32), device="cpu")


def _half_even(d):
    """Python's int(round(d / 2)) for integer DataNodes d >= 0 (torchvision's centre-crop offset)."""
    q = d // 2
    return q + (d - 2 * q) * (q - 2 * (q // 2))  # an odd d rounds x.5 to the even neighbour
