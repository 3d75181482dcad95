"""DALI graphs for fastfit: the train and val pipelines over a file list, on the GPU ('mixed' decode) or the CPU.

Each pipeline reads `path label` lines in the order given (the host decides order and sharding, see dali.py),
so one graph serves any epoch, rank or resume point. Outputs: images normalized with mean/std (×255), in HWC
(channels-last once permuted) or CHW, float16 on the GPU or float32 on the CPU; labels int64 (B, 1), on the GPU
when the images are.

Train augmentations, matching fastfit/data/torchvision.py:
  rrc       fused decode + random-resized-crop (ROI decode), resize to image_size × image_size
  pad-crop  full decode, zero-pad by max(1, image_size // 8) and take a random image_size crop (like RandomCrop)
  none      resize the shorter side to image_size, center crop
then an optional horizontal flip (p = 0.5) fused into crop_mirror_normalize.
Val: resize the shorter side to val_resize (0 = none), center crop image_size (padded with black if smaller).
"""

from __future__ import annotations

from dataclasses import dataclass

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import Pipeline

PREFETCH_DEPTH = 2  # batches decoded ahead of the one the step consumes: loading overlaps compute


@dataclass(frozen=True)
class PipelineSpec:
    """Where and how a pipeline runs; the same for train and val of one loader pair."""

    gpu: bool  # 'mixed' decode + GPU ops, else everything on the CPU
    device_id: int | None  # CUDA device (from LOCAL_RANK) or None on the CPU
    threads: int
    hw_decoder_load: float  # share of JPEGs for the hardware decoder (A100/H100/H200), 'mixed' only
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool  # HWC output (a channels-last NCHW view after permute) or CHW
    prefetch: int = PREFETCH_DEPTH

    @property
    def out_dtype(self):
        return types.FLOAT16 if self.gpu else types.FLOAT


def _read(file_list: str):
    # pad_last_batch: the last partial batch repeats its final sample instead of wrapping into the next epoch;
    # the host trims it, so no sample is ever counted twice.
    return fn.readers.file(file_list=file_list, random_shuffle=False, pad_last_batch=True, name="Reader")


def _decoder_args(spec: PipelineSpec) -> dict:
    # EXIF orientation is ignored, as torchvision's ImageFolder loader (PIL) ignores it: same pixels either way.
    if not spec.gpu:
        return dict(device="cpu", output_type=types.RGB, adjust_orientation=False)
    # nvJPEG buffer paddings stay at DALI's defaults: NVIDIA's ImageNet example preallocates ~1.7 GB of device and
    # ~2 GB of pinned memory per pipeline for 8 threads, which a pipeline rebuilt every epoch would pay again.
    return dict(device="mixed", output_type=types.RGB, adjust_orientation=False, hw_decoder_load=spec.hw_decoder_load)


def _height_width(jpegs):
    """(H, W) of each encoded image as float nodes, read from its header (CPU, no decode)."""
    shape = fn.cast(fn.peek_image_shape(jpegs, adjust_orientation=False), dtype=types.FLOAT)
    return shape[0], shape[1]


def _resize_shorter(height, width, size: int):
    """torchvision Resize(size) output extents: the shorter side becomes `size`, the longer one
    int(size · long / short) (truncated, where DALI's resize_shorter would round: a pixel off, a different scale)."""
    width_is_short = fn.cast(width <= height, dtype=types.FLOAT)
    longer = dmath.floor(size * dmath.max(height, width) / dmath.min(height, width))
    return (
        width_is_short * longer + (1 - width_is_short) * size,
        width_is_short * size + (1 - width_is_short) * longer,
    )


def _center_crop_pos(extent, size: int):
    """crop_pos for crop_mirror_normalize (rounding='truncate') that puts the window where torchvision's CenterCrop
    does: offset round-half-even((extent − size) / 2), or, when the image is smaller, padding (size − extent) // 2
    before it. Elementwise math on per-sample scalars, since DALI's own rounding is half-away-from-zero."""
    d = extent - size
    smaller = fn.cast(d < 0, dtype=types.FLOAT)
    half_down = dmath.floor(d / 2)
    round_up = fn.cast(d - 4 * dmath.floor(d / 4) == 3, dtype=types.FLOAT)  # d ≡ 3 (mod 4): k + ½ with k odd
    offset = smaller * -dmath.floor(-d / 2) + (1 - smaller) * (half_down + round_up)
    target = offset + 0.5 - smaller  # truncation toward zero of (pos · d) then lands exactly on `offset`
    nonzero = d + fn.cast(d == 0, dtype=types.FLOAT)
    return target / nonzero


def _normalize(images, spec: PipelineSpec, mirror=0, center_of=None):
    """crop_mirror_normalize to the output dtype and layout; `center_of=(H, W)` also takes the center crop."""
    mean = [m * 255.0 for m in spec.mean]
    std = [s * 255.0 for s in spec.std]
    extra = {}
    if center_of is not None:  # pixels outside the image come out black after normalization, as in torchvision
        height, width = center_of
        extra = dict(
            crop=(spec.image_size, spec.image_size),
            crop_pos_y=_center_crop_pos(height, spec.image_size),
            crop_pos_x=_center_crop_pos(width, spec.image_size),
            rounding="truncate",
            out_of_bounds_policy="pad",
            fill_values=[-m / s for m, s in zip(spec.mean, spec.std, strict=True)],
        )
    return fn.crop_mirror_normalize(
        images,
        dtype=spec.out_dtype,
        output_layout="HWC" if spec.channels_last else "CHW",
        mean=mean,
        std=std,
        mirror=mirror,
        **extra,
    )


def _labels(labels, spec: PipelineSpec):
    labels = fn.cast(labels, dtype=types.INT64)
    return labels.gpu() if spec.gpu else labels


def _pipeline(spec: PipelineSpec, batch_size: int, seed: int) -> Pipeline:
    return Pipeline(
        batch_size=batch_size,
        num_threads=spec.threads,
        device_id=spec.device_id,
        seed=seed,
        prefetch_queue_depth=spec.prefetch,
    )


def train_pipeline(
    spec: PipelineSpec,
    file_list: str,
    batch_size: int,
    seed: int,
    augment: str,
    rrc_scale: tuple[float, float],
    rrc_ratio: tuple[float, float],
    hflip: bool,
) -> Pipeline:
    size = spec.image_size
    pipe = _pipeline(spec, batch_size, seed)
    with pipe:
        jpegs, labels = _read(file_list)
        mirror = fn.random.coin_flip(probability=0.5) if hflip else 0
        if augment == "rrc":
            images = fn.decoders.image_random_crop(
                jpegs,
                random_area=list(rrc_scale),
                random_aspect_ratio=list(rrc_ratio),
                num_attempts=10,
                **_decoder_args(spec),
            )
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True)
            images = _normalize(images, spec, mirror)
        elif augment == "pad-crop":
            pad = max(1, size // 8)
            height_width = fn.cast(fn.peek_image_shape(jpegs, adjust_orientation=False)[0:2], dtype=types.FLOAT)
            # torchvision RandomCrop on the padded image: top-left uniform in [0, H + 2·pad − size], in padded
            # coordinates; shifted by −pad it becomes a slice start that may begin outside the image.
            u = fn.random.uniform(range=[0.0, 1.0], shape=[2])
            start = fn.cast(dmath.floor(u * (height_width + float(2 * pad - size + 1))), dtype=types.INT32) - pad
            images = fn.decoders.image(jpegs, **_decoder_args(spec))
            images = fn.slice(
                images,
                start,
                [size, size],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0,
                normalized_anchor=False,
                normalized_shape=False,
            )
            images = _normalize(images, spec, mirror)
        elif augment == "none":
            images = fn.decoders.image(jpegs, **_decoder_args(spec))
            height, width = _resize_shorter(*_height_width(jpegs), size)
            images = fn.resize(images, resize_y=height, resize_x=width, antialias=True)
            images = _normalize(images, spec, mirror, center_of=(height, width))
        else:
            raise ValueError(f"expected data.augment in 'rrc', 'pad-crop', 'none', got {augment!r}")
        pipe.set_outputs(images, _labels(labels, spec))
    return pipe


def val_pipeline(spec: PipelineSpec, file_list: str, batch_size: int, val_resize: int) -> Pipeline:
    pipe = _pipeline(spec, batch_size, seed=0)
    with pipe:
        jpegs, labels = _read(file_list)
        images = fn.decoders.image(jpegs, **_decoder_args(spec))
        height, width = _height_width(jpegs)
        if val_resize > 0:
            height, width = _resize_shorter(height, width, val_resize)
            images = fn.resize(images, resize_y=height, resize_x=width, antialias=True)
        pipe.set_outputs(_normalize(images, spec, center_of=(height, width)), _labels(labels, spec))
    return pipe
