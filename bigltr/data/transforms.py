"""Image transforms of the torch reader (``ShardLoader``), for square and non-square network inputs.

``img_size`` (config ``data.img_size``) is the network input: an int S or ``[S]`` (S x S, the usual case) or
``[H, W]`` (H rows, W columns: e.g. ``[28, 56]`` for the Fashion-MNIST pairs of ``make_shards.py idx --pairs``).
:func:`image_hw` reads every form; the DALI pipeline (``bigltr.data.dali``) uses it too, so both readers give
``[in_chans, H, W]`` tensors.

Augmentations (``aug``):

* ``none``: resize to H x W only when the image has another size (bilinear, antialiased), to tensor, normalise;
* ``cifar``: ``none`` plus, when training, a random H x W crop of the image padded by 4 px of zeros and a horizontal
  flip with p = 0.5;
* ``crop``: ``cifar`` without the flip, for images whose mirror image belongs to another class (the pairs set:
  flipping ``left | right`` shows ``mirror(right) | mirror(left)``, i.e. pair class ``C*right + left``);
* ``imagenet``: timm's ``create_transform`` with input size ``(in_chans, H, W)``.
"""
from __future__ import annotations

from typing import Callable, Sequence

from bigltr.config import AUGS, image_hw  # the augmentation names and the one rule for data.img_size

__all__ = ["AUGS", "image_hw", "build_transform"]


def _size_text(hw: tuple[int, int]) -> str:
    return str(hw[0]) if hw[0] == hw[1] else f"{hw[0]}x{hw[1]}"


class _ToMode:
    """Convert a PIL image to a fixed mode ("L" or "RGB")."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class _ResizeIfNeeded:
    """Resize to H x W only when the image has another size (no-op for 32x32 CIFAR at 32, 28x56 pairs at [28, 56])."""

    def __init__(self, size):
        from torchvision import transforms as T

        self.hw = image_hw(size)
        self.resize = T.Resize(self.hw, interpolation=T.InterpolationMode.BILINEAR, antialias=True)

    def __call__(self, img):
        return img if img.size == (self.hw[1], self.hw[0]) else self.resize(img)  # PIL size is (W, H)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded({_size_text(self.hw)})"


def build_transform(
    *,
    img_size,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    aug: str,
) -> Callable:
    """PIL image -> float tensor ``[in_chans, H, W]`` (``img_size``: S, ``[S]`` or ``[H, W]``; see the module
    docstring for ``aug``). Images are first converted to "L" (in_chans 1) or "RGB" (in_chans 3). A square size
    gives exactly the transforms of a plain int S."""
    from torchvision import transforms as T

    if in_chans not in (1, 3):
        raise ValueError(f"build_transform: in_chans must be 1 or 3, got {in_chans}")
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"build_transform: mean and std need {in_chans} values, got {tuple(mean)}, {tuple(std)}")
    try:
        h, w = image_hw(img_size)
    except ValueError as e:
        raise ValueError(f"build_transform: {e}") from None
    to_mode = _ToMode("L" if in_chans == 1 else "RGB")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if aug == "imagenet":
        from timm.data import create_transform

        # square: exactly the earlier call; non-square: timm's eval resize keeps the aspect ratio, centre-crops H x W
        tf = create_transform(input_size=(in_chans, h, w), is_training=train, mean=mean, std=std)
        return T.Compose([to_mode, tf])
    if aug not in AUGS:
        raise ValueError(f"build_transform: aug must be one of {', '.join(map(repr, AUGS))}, got {aug!r}")
    size = h if h == w else (h, w)  # RandomCrop(S) and RandomCrop((S, S)) draw alike
    ops: list = [to_mode, _ResizeIfNeeded((h, w))]
    if aug in ("cifar", "crop") and train:
        ops.append(T.RandomCrop(size, padding=4))
        if aug == "cifar":
            ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)
