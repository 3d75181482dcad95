"""DALI graphs for fastfit: the train and val pipelines over a file list, on the GPU ('mixed' decode) or the CPU.

Each pipeline reads `path label` lines in the order given (the host decides order and sharding, see dali.py),
so one graph serves any epoch, rank or resume point. Outputs: images normalized with mean/std (×255), in HWC
(channels-last once permuted) or CHW, float16 on the GPU or float32 on the CPU; labels int64 (B, 1), on the GPU
when the images are.

Train augmentations, matching fastfit/data/torchvision_backend.py:
  rrc       RandomResizedCrop's window (up to 10 draws, then its centre fallback), ROI decode, resize to image_size
  pad-crop  full decode, zero-pad by max(1, image_size // 8) and take a random image_size crop (like RandomCrop)
  none      resize the shorter side to image_size, center crop
then an optional horizontal flip (p = 0.5) fused into crop_mirror_normalize. Their random numbers come from the
host, one row per sample (an external_source), never from DALI's generators: the host keys them on the
sample, so crops do not depend on the pipeline's seed, batch position, rank or start point.
Val: resize the shorter side to val_resize (0 = none), center crop image_size (padded with black if smaller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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


# Per-sample random numbers the host feeds to the train graph (see sample_random.py), one row per sample:
# [anchor y, anchor x, flip, then (area, log aspect ratio) for each of torchvision's RRC_TRIES window draws].
RRC_TRIES = 10  # torchvision's RandomResizedCrop draws up to 10 windows, then falls back to a centre crop
CROP_ANCHORS, FLIP, TRIES_FROM = slice(0, 2), 2, 3
RANDOMS = TRIES_FROM + 2 * RRC_TRIES


def _host_params(u: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool):
    """The graph's per-sample inputs from the uniforms `u` (B, RANDOMS), computed on the host where they do not need
    the image: DALI's arithmetic costs per operator and sample, so the graph keeps only what needs H and W.
    Returns (extent factors (RRC_TRIES, 2) [√(a/r), √(a·r)] per try, anchor uniforms [y, x], mirror flags): area
    fraction a = lerp(scale) and aspect r = exp(lerp(log ratio)), as torchvision draws them, so try k's window is
    factor_k · √(H·W) pixels high and wide."""
    u = u.astype(np.float64)
    tries = u[:, TRIES_FROM:].reshape(len(u), RRC_TRIES, 2)
    area = scale[0] + tries[..., 0] * (scale[1] - scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + tries[..., 1] * (log_hi - log_lo))
    factors = np.stack([np.sqrt(area / aspect), np.sqrt(area * aspect)], axis=-1).astype(np.float32)
    mirror = ((u[:, FLIP] < 0.5) & hflip).astype(np.int32)
    return factors, u[:, CROP_ANCHORS].astype(np.float32), mirror


def _height_width_vector(jpegs):
    """[H, W] of each encoded image as one float node (vector arithmetic: one operator for both axes)."""
    return fn.cast(fn.peek_image_shape(jpegs, adjust_orientation=False)[0:2], dtype=types.FLOAT)


def _rrc_window(height_width, factors, anchors, ratio: tuple[float, float]):
    """(start, extent) [y, x] of torchvision's RandomResizedCrop window: the first of the RRC_TRIES windows
    round(factor_k · √(H·W)) that fits (1 ≤ h ≤ H, 1 ≤ w ≤ W), its top-left uniform over the positions that fit;
    if none fits, the centre crop of the largest window within the ratio range (h = round(W / ratio_min) or
    w = round(H · ratio_max), capped at the image), at ((H − h) // 2, (W − w) // 2). Vector arithmetic over all
    tries and a few reductions, the same count of operators whatever the tries' outcome."""
    extents = dmath.floor(factors * dmath.sqrt(height_width[0] * height_width[1]) + 0.5)  # (RRC_TRIES, 2)
    # 1 ≤ e ≤ size ⇔ |2e − size − 1| ≤ size − 1, per axis; a try fits when both axes do.
    axis_fits = fn.cast(dmath.abs(2 * extents - height_width - 1) <= height_width - 1, dtype=types.FLOAT)
    fits = fn.reductions.min(axis_fits, axes=1)
    tries = types.Constant(np.arange(RRC_TRIES, dtype=np.float32))
    first = fn.reductions.min(tries + RRC_TRIES * (1 - fits))  # RRC_TRIES when no try fits
    chosen = fn.reshape(fn.cast(tries == first, dtype=types.FLOAT), shape=[RRC_TRIES, 1])
    drawn = fn.reductions.sum(extents * chosen, axes=0)  # zeros when no try fits
    found = fn.cast(first < RRC_TRIES, dtype=types.FLOAT)
    swapped = fn.stack(height_width[1], height_width[0])  # [W, H]
    limits = types.Constant(np.array([1 / ratio[0], ratio[1]], dtype=np.float32))
    fallback = dmath.min(height_width, dmath.floor(swapped * limits + 0.5))
    extent = found * drawn + (1 - found) * fallback
    room = height_width - extent
    # u < 1 in float32: never past H − h, W − w
    start = found * dmath.floor(anchors * (room + 1)) + (1 - found) * dmath.floor(room / 2)
    return start, extent


def _random_resized_crop(jpegs, factors, anchors, ratio: tuple[float, float], spec: PipelineSpec):
    """ROI decode of torchvision's RandomResizedCrop window (_rrc_window), resized to image_size."""
    start, extent = _rrc_window(_height_width_vector(jpegs), factors, anchors, ratio)
    images = fn.decoders.image_slice(
        jpegs,
        start=fn.cast(start, dtype=types.INT32),
        shape=fn.cast(extent, dtype=types.INT32),
        axis_names="HW",
        **_decoder_args(spec),
    )
    return fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size, antialias=True)


def _pad_crop(jpegs, anchors, spec: PipelineSpec):
    """torchvision RandomCrop(image_size, padding=max(1, image_size // 8)) with zero fill."""
    size = spec.image_size
    pad = max(1, size // 8)
    # RandomCrop on the padded image: top-left uniform in [0, H + 2·pad − size], in padded coordinates; shifted
    # by −pad it becomes a slice start that may begin outside the image.
    start = dmath.floor(anchors * (_height_width_vector(jpegs) + float(2 * pad - size + 1))) - pad
    images = fn.decoders.image(jpegs, **_decoder_args(spec))
    return fn.slice(
        images,
        fn.cast(start, dtype=types.INT32),
        [size, size],
        axis_names="HW",
        out_of_bounds_policy="pad",
        fill_values=0,
        normalized_anchor=False,
        normalized_shape=False,
    )


def train_pipeline(
    spec: PipelineSpec,
    file_list: str,
    batch_size: int,
    randoms,
    augment: str,
    rrc_scale: tuple[float, float],
    rrc_ratio: tuple[float, float],
    hflip: bool,
) -> Pipeline:
    """The train graph over `file_list`. `randoms(iteration)` returns float32 (batch_size, RANDOMS) uniforms in
    [0, 1), row i for the i-th file of that batch: every crop and flip comes from them, none from DALI's own
    generators, so the pipeline's seed does not matter and a sample's augmentation is whatever the host keyed
    its row on (the row's layout: RANDOMS)."""
    if augment not in ("rrc", "pad-crop", "none"):
        raise ValueError(f"expected data.augment in 'rrc', 'pad-crop', 'none', got {augment!r}")
    pipe = _pipeline(spec, batch_size, seed=0)
    with pipe:
        jpegs, labels = _read(file_list)
        # Only the inputs this augmentation reads (DALI warns about unused outputs): rrc all three, pad-crop the
        # anchors and the flip, none the flip.
        used = {"rrc": (0, 1, 2), "pad-crop": (1, 2), "none": (2,)}[augment]

        def source(info):  # once per batch: every output of the host's computation at once
            params = _host_params(randoms(info.iteration), rrc_scale, rrc_ratio, hflip)
            return [params[i] for i in used]

        inputs = fn.external_source(
            source=source,
            num_outputs=len(used),
            batch=True,
            batch_info=True,
            dtype=[(types.FLOAT, types.FLOAT, types.INT32)[i] for i in used],
            ndim=[(2, 1, 0)[i] for i in used],
        )
        mirror = inputs[-1]
        if augment == "rrc":
            factors, anchors, _ = inputs
            images = _normalize(_random_resized_crop(jpegs, factors, anchors, rrc_ratio, spec), spec, mirror)
        elif augment == "pad-crop":
            images = _normalize(_pad_crop(jpegs, inputs[0], spec), spec, mirror)
        else:
            images = fn.decoders.image(jpegs, **_decoder_args(spec))
            height, width = _resize_shorter(*_height_width(jpegs), spec.image_size)
            images = fn.resize(images, resize_y=height, resize_x=width, antialias=True)
            images = _normalize(images, spec, mirror, center_of=(height, width))
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
