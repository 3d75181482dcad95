"""The NVIDIA DALI input path: JPEG decode + augmentation on the GPU ('mixed'), or DALI's CPU pipeline without CUDA.

Same contract and semantics as the torchvision backend, with which it shares fastfit.data.samples for listing
samples (class index = sorted folder name, subsets) and for sharding (ShardedSampler: a permutation seeded by
seed + epoch, the tail dropped, dealt round-robin to ranks). The host computes each rank's file order and hands
it to DALI as a file list; the reader only reads it in order. So every epoch and every resume point (epoch, start_step)
gets exactly the samples torchvision would give, and a 2-rank run sees the global batches of a 1-rank run.

Randomness of the crops and flips is a pure function of (seed, epoch, sample's dataset index): the host computes
each sample's uniforms (fastfit/data/sample_random.py, a counter hash, no generator state) and feeds them to the
graph with the file list's order; DALI's own generators are not used. So a resume from any (epoch, start_step)
gives bitwise the batches of the uninterrupted epoch, and a 2-rank run's batches hold bitwise the pixels of a
1-rank run's global batches. The random-resized-crop follows torchvision's RandomResizedCrop (up to 10 window
draws, then the centre fallback; see dali_pipelines.py): the same distribution of windows, not the same windows
(the draws come from the hash, not torch's generator).

Cost of exactness: one pipeline per epoch. Building it writes the file list (≈0.45 s per million files) and
parses it in DALI (≈0.15 s per million), timed on the 2-core development machine: for ImageNet on one GPU
≈0.6 s per ≈150 s epoch, on 8 GPUs ≈0.08 s per rank. (Passing the list as `files=` instead costs ≈2.2 s per
million in DALI's argument handling.) The per-sample uniforms and crop factors cost ≈0.25 ms per batch of
256 on the loop's thread (≈1 s per million samples). DALI's own sharding (`shard_id`/`num_shards`,
`shuffle_after_epoch`) would avoid the rebuild but deals contiguous blocks, cannot start mid-epoch, and would not
match the torchvision backend's order. Each epoch's
first batch also waits for a fresh pipeline to fill its prefetch queue.

Bad files. DALI 2.4's decoder can crash the process (SIGSEGV, no message) on a non-image or header-corrupt
file in a batch of 32 or more, so no such file may reach it: at build time every file of both splits gets the
fast header check of fastfit/data/check.py (≈50 µs per file on one core; spread over the ranks and over forked
processes: a few seconds for ImageNet). Files that pass it but still fail to decode (corrupt entropy data) stop
the pipeline with an error at their batch; the loader finds the file (DALI's message names it, or each file of
that batch is decoded on the host) and rebuilds from that batch. Either way, without data.skip_bad a DataError
names the file; with it the file is recorded in `bad_files` and handled as the torchvision backend does:
replaced by the next sample in dataset order (train) or dropped (val).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastfit.config import DataConfig
from fastfit.data.auto import cpus_per_rank, resolve_dali_threads
from fastfit.data.sample_random import sample_uniforms
from fastfit.data.samples import (
    BadFileLog,
    ShardedSampler,
    bad_file_message,
    balanced_subset,
    check_start_step,
    image_folder,
    load_image_folders,
)
from fastfit.dist import DistEnv
from fastfit.errors import DataError

_DECODE_CHECK_WORKERS = 16


def require_dali():
    """nvidia.dali, or a DataError saying how to install it."""
    try:
        import nvidia.dali
        import nvidia.dali.plugin.pytorch  # noqa: F401  (feed_ndarray)
    except ImportError as err:
        raise DataError(
            "data.backend=dali needs NVIDIA DALI, which is not installed: pip install fastfit[dali] "
            "(nvidia-dali-cuda130), or set data.backend=torchvision"
        ) from err
    return nvidia.dali


def read_file_list(path: str | os.PathLike, root: str | os.PathLike) -> list[tuple[str, int]]:
    """(absolute path, label) pairs from a text file of `relative/path label` lines (DALI's file_list format).

    Relative paths are taken from `root` (the dataset root); absolute paths are kept. Paths may contain spaces
    (the label is the last field). Blank lines and lines starting with '#' are skipped.
    """
    path, root = Path(path).expanduser(), Path(root).expanduser()
    if not path.is_file():
        raise DataError(f"file list {path} does not exist; give a text file of 'relative/path label' lines")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{path} line {number}: expected 'relative/path label' with a label >= 0, got {line!r}")
        samples.append((str(root / parts[0]), int(parts[1])))
    if not samples:
        raise DataError(f"file list {path} has no 'relative/path label' lines")
    return samples


def _write_file_list(samples: list[tuple[str, int]]) -> str:
    fd, name = tempfile.mkstemp(prefix="fastfit-dali-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:  # _check_paths has made sure every name encodes
        handle.write("".join(f"{p} {label}\n" for p, label in samples))
    return name


def _check_paths(samples: list[tuple[str, int]]) -> None:
    # DALI's list format is one "path label" per line and strips trailing blanks: such names cannot pass through.
    # The list is UTF-8 text, so a name that is not UTF-8 (Python holds its bytes as surrogates) cannot either.
    for p, _ in samples:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"file name {os.fsencode(p)!r} is not valid UTF-8, which DALI's file list cannot hold; rename the "
                "file to UTF-8 (e.g. convmv -f latin1 -t utf8 -r --notest DIR) or use data.backend=torchvision"
            ) from None
        if "\n" in p or p != p.rstrip():
            raise DataError(
                f"file name {p!r} has a newline or trailing whitespace, which DALI's file list cannot "
                "hold; rename the file"
            )


class _DaliLoader(BadFileLog):
    """What train and val share: pipeline set-up, DALI → torch copies, finding and recording bad files."""

    def __init__(
        self, samples: list[tuple[str, int]], spec, env: DistEnv, batch_size: int, skip_bad: bool, known_bad: set[str]
    ):
        super().__init__()
        _check_paths(samples)
        self.samples = samples
        self.spec = spec
        self.env = env
        self.batch_size = batch_size
        self.skip_bad = skip_bad
        self._bad_positions: set[int] = {i for i, (path, _) in enumerate(samples) if path in known_bad}

    def _build(self, make_pipeline, positions: list[int]):
        file_list = _write_file_list([self.samples[p] for p in positions])
        try:
            pipe = make_pipeline(file_list)
            pipe.build()  # parses the list; the file can go
        finally:
            os.unlink(file_list)
        return pipe

    def _to_torch(self, outputs, count: int, zero_copy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch views of a DALI batch, as DALIGenericIterator makes them. DALI's dynamic executor (the default)
        keeps an output's memory alive while anything references it and DLPack orders torch's stream after
        DALI's: zero copy. The static executor recycles its buffers, so there each batch is copied out."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        device = self.env.device if self.spec.gpu else torch.device("cpu")
        tensors = []
        for output in outputs:
            dense = output.as_tensor()
            if zero_copy:
                with device:
                    tensor = torch.from_dlpack(dense)
            else:
                dtype = (torch.float16 if self.spec.gpu else torch.float32) if len(tensors) == 0 else torch.int64
                tensor = torch.empty(dense.shape(), dtype=dtype, device=device)
                feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream(device) if self.spec.gpu else None)
            tensors.append(tensor[:count])
        images, labels = tensors
        if self.spec.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels-last without a copy
        return images, labels.view(-1)

    def _find_bad(self, err: RuntimeError, positions: list[int], batch: int) -> dict[int, str]:
        """Positions (dataset indices) of the files that made DALI fail in `batch` of this pipeline's list."""
        from fastfit.data.check import check_files

        message = str(err)
        # Read errors come from the reader, which runs ahead of the batch being produced: match by name.
        named = {p: dali_reason(err) for p in dict.fromkeys(positions) if self.samples[p][0] in message}
        if named:
            return named
        start, size = batch * self.batch_size, self.batch_size
        # The failing batch first; then the batches DALI was already preparing, in case the error surfaced late.
        for end in (start + size, start + (1 + self.spec.prefetch) * size):
            window = list(dict.fromkeys(positions[start:end]))
            reasons = check_files([self.samples[p][0] for p in window], decode=True, workers=_DECODE_CHECK_WORKERS)
            found = {p: r for p, r in zip(window, reasons, strict=True) if r is not None}
            if not found:  # decodable by PIL: try DALI's own CPU decoder on each (rare; one tiny pipeline per file)
                found = {p: r for p in window if (r := _dali_decode_problem(self.samples[p][0]))}
            if found:
                return found
        return {}

    def _handle_failure(self, err: RuntimeError, positions: list[int], batch: int) -> dict[int, str]:
        found = self._find_bad(err, positions, batch)
        if not found:
            raise err  # not a file problem (e.g. out of memory): DALI's own message is the useful one
        if not self.skip_bad:
            position, reason = next(iter(found.items()))
            raise DataError(bad_file_message(self.samples[position][0], reason)) from err
        self._bad_positions.update(found)
        self.note_bad([self.samples[p][0] for p in found])
        return found


def _zero_copy(pipe) -> bool:
    return bool(getattr(pipe, "exec_dynamic", False))  # absent in DALI releases that only had the static executor


def _dali_decode_problem(path: str) -> str | None:
    """Why DALI's CPU decoder rejects `path` (None if it decodes): the last word on files PIL accepts."""
    import nvidia.dali.fn as fn
    from nvidia.dali import Pipeline

    pipe = Pipeline(batch_size=1, num_threads=1, device_id=None)
    with pipe:
        data, _ = fn.readers.file(files=[path])
        pipe.set_outputs(fn.decoders.image(data, device="cpu"))
    try:
        pipe.build()
        pipe.run()
    except RuntimeError as err:
        return f"DALI cannot decode it ({dali_reason(err)})"
    finally:
        del pipe
    return None


def dali_reason(err: Exception) -> str:
    """The line of a DALI error that says what went wrong (its messages wrap it in a traceback of the graph)."""
    lines = [line.strip() for line in str(err).splitlines()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    useful = [line for line in lines if line and not line.startswith(("Current pipeline", "C++ context", "Critical"))]
    return useful[0] if useful else str(err).strip()


class DaliTrainLoader(_DaliLoader):
    def __init__(
        self,
        samples,
        spec,
        cfg: DataConfig,
        env: DistEnv,
        batch_size: int,
        seed: int,
        known_bad: set[str] = frozenset(),
    ):
        super().__init__(samples, spec, env, batch_size, cfg.skip_bad, known_bad)
        self.note_bad(sorted(samples[p][0] for p in self._bad_positions))
        self.cfg = cfg
        self.seed = seed
        self.sampler = ShardedSampler(len(samples), env, seed, shuffle=True, batch_size=batch_size)
        self.steps_per_epoch = len(samples) // (batch_size * env.world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training set has {len(samples)} images, fewer than one global batch of "
                f"{batch_size * env.world_size}; lower optim.batch_size"
            )

    def _substitute(self, position: int) -> int:
        """The sample read in place of `position`: itself, or the next one in dataset order not known to be bad."""
        for offset in range(len(self.samples)):
            candidate = (position + offset) % len(self.samples)
            if candidate not in self._bad_positions:
                return candidate
        raise DataError(
            "every training image failed to decode; check the folder with: fastfit data check DATA_ROOT --decode"
        )

    def _randoms(self, epoch: int, keys: list[int]):
        """randoms(iteration) for a pipeline reading the samples `keys` (dataset indices) in batches: each row keyed
        on (seed, epoch, index), so a sample's crop and flip do not depend on the rank, batch or resume point.
        A substituted bad file keeps the key of the sample it stands in for. Past the list's end the reader wraps
        (prefetching), and so do the keys."""
        from fastfit.data.dali_pipelines import RANDOMS

        keys = np.asarray(keys, dtype=np.int64)
        batches = max(1, math.ceil(len(keys) / self.batch_size))

        def randoms(iteration: int) -> np.ndarray:
            start = iteration % batches * self.batch_size
            batch = keys[start : start + self.batch_size]
            batch = np.pad(batch, (0, self.batch_size - len(batch)), mode="edge")  # pad_last_batch repeats the last
            return sample_uniforms(self.seed, epoch, batch, RANDOMS)

        return randoms

    def _pipeline(self, epoch: int, keys: list[int]):
        from fastfit.data.dali_pipelines import train_pipeline

        cfg = self.cfg
        return lambda file_list: train_pipeline(
            self.spec,
            file_list,
            self.batch_size,
            self._randoms(epoch, keys),
            cfg.augment,
            tuple(cfg.rrc_scale),
            tuple(cfg.rrc_ratio),
            cfg.hflip,
        )

    def epoch(self, epoch: int, start_step: int = 0):
        check_start_step(start_step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, start_step)
        order = [index for _, index in self.sampler]  # this rank's samples from start_step on
        step = start_step
        while step < self.steps_per_epoch:
            first = step  # the pipeline built now starts at this step (a rebuild after a bad file starts later)
            keys = order[(first - start_step) * self.batch_size :]
            positions = [self._substitute(p) for p in keys]
            pipe = self._build(self._pipeline(epoch, keys), positions)
            try:
                while step < self.steps_per_epoch:
                    try:
                        outputs = pipe.run()
                    except RuntimeError as err:
                        self._handle_failure(err, positions, step - first)
                        break  # rebuild from `step` with the bad file substituted
                    yield self._to_torch(outputs, self.batch_size, _zero_copy(pipe))
                    step += 1
            finally:
                del pipe


class DaliValLoader(_DaliLoader):
    def __init__(
        self, samples, spec, cfg: DataConfig, env: DistEnv, batch_size: int, known_bad: set[str] = frozenset()
    ):
        super().__init__(samples, spec, env, batch_size, cfg.skip_bad, known_bad)
        self.val_resize = cfg.val_resize
        sampler = ShardedSampler(len(samples), env, seed=0, shuffle=False, batch_size=None)
        self._mine = [index for _, index in sampler]
        self._bad_positions &= set(self._mine)  # the val loader only ever drops its own rank's files
        self.note_bad(sorted(samples[p][0] for p in self._bad_positions))
        self.num_samples = len(self._mine) - len(self._bad_positions)

    def _pipeline(self):
        from fastfit.data.dali_pipelines import val_pipeline

        return lambda file_list: val_pipeline(self.spec, file_list, self.batch_size, self.val_resize)

    def __iter__(self):
        done = 0  # samples of this rank already yielded in this pass
        while True:
            live = [p for p in self._mine if p not in self._bad_positions]  # bad files are dropped, not replaced
            positions = live[done:]
            if not positions:
                return
            pipe = self._build(self._pipeline(), positions)
            try:
                for batch in range(math.ceil(len(positions) / self.batch_size)):
                    try:
                        outputs = pipe.run()
                    except RuntimeError as err:
                        self._handle_failure(err, positions, batch)
                        self.num_samples = len(self._mine) - len(self._bad_positions)  # only this rank's files
                        break  # rebuild from `done` without the dropped files
                    count = min(self.batch_size, len(positions) - batch * self.batch_size)
                    yield self._to_torch(outputs, count, _zero_copy(pipe))
                    done += count
                else:
                    return
            finally:
                del pipe


def _pipeline_spec(cfg: DataConfig, env: DistEnv, channels_last: bool):
    from fastfit.data.dali_pipelines import PipelineSpec

    gpu = env.device.type == "cuda" and torch.cuda.is_available()
    device_id = (env.device.index if env.device.index is not None else env.local_rank) if gpu else None
    return PipelineSpec(
        gpu=gpu,
        device_id=device_id,
        threads=resolve_dali_threads(cfg),
        hw_decoder_load=cfg.dali_hw_decoder_load,
        image_size=cfg.image_size,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        channels_last=channels_last,
    )


def scan_bad_files(paths: list[str], env: DistEnv) -> dict[str, str]:
    """path → reason for the files that fail the fast header check. Under torchrun each rank checks a 1/world
    share and the results are exchanged, so every rank ends with the same answer for a fraction of the work."""
    from fastfit.data.check import check_files

    paths = sorted(set(paths))
    distributed = env.distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
    share = paths[env.rank :: env.world_size] if distributed else paths
    found = {p: r for p, r in zip(share, check_files(share, workers=cpus_per_rank()), strict=True) if r is not None}
    if distributed:
        gathered: list = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, found)
        found = {p: r for part in gathered for p, r in part.items()}
    return found


def _split_samples(root: Path, split_dir: str, file_list, subset: int, seed: int):
    """(samples, class names or None) of one split: its file list if given, else its ImageFolder; then the subset."""
    if file_list is not None:
        samples, classes = read_file_list(file_list, root), None
    else:
        folder = image_folder(root, split_dir)
        samples, classes = folder.samples, folder.classes
    if subset:
        samples = [samples[i] for i in balanced_subset([label for _, label in samples], subset, seed)]
    return samples, classes


def build_dali_loaders(
    cfg: DataConfig,
    env: DistEnv,
    root: Path,
    batch_size: int,
    seed: int,
    channels_last: bool,
    train_list: str | os.PathLike | None = None,
    val_list: str | os.PathLike | None = None,
):
    """(train loader, val loader, class names) for this rank; `batch_size` is per rank.

    Samples come from the ImageFolder layout under `root` (cfg.train_dir / cfg.val_dir), or, for a split whose
    `*_list` is given, from that file of `relative/path label` lines (paths relative to `root`). Class names are
    the folder names, or the label numbers as strings when both splits come from lists.
    """
    require_dali()
    if cfg.augment not in ("rrc", "pad-crop", "none"):
        raise DataError(
            f"data.augment={cfg.augment!r} is not supported by the DALI backend (rrc, pad-crop, none); "
            "use data.backend=torchvision"
        )
    if train_list is None and val_list is None:  # the common case, listed exactly as the torchvision backend does
        train_folder, train_idx, val_folder, val_idx = load_image_folders(cfg, root, seed)
        train, val = [train_folder.samples[i] for i in train_idx], [val_folder.samples[i] for i in val_idx]
        classes = train_folder.classes
    else:
        train, train_classes = _split_samples(root, cfg.train_dir, train_list, cfg.train_subset, seed)
        val, val_classes = _split_samples(root, cfg.val_dir, val_list, cfg.val_subset, seed)
        top = max(label for _, label in train + val)
        classes = train_classes or val_classes or [str(i) for i in range(top + 1)]
        if top >= len(classes):
            raise DataError(
                f"a file list has label {top} but {root} has only {len(classes)} class folders; "
                "labels must index the sorted class folders"
            )
    bad = scan_bad_files([p for p, _ in train + val], env)
    if bad and not cfg.skip_bad:
        path, reason = next(iter(bad.items()))
        raise DataError(bad_file_message(path, reason, others=len(bad) - 1))
    spec = _pipeline_spec(cfg, env, channels_last)
    return (
        DaliTrainLoader(train, spec, cfg, env, batch_size, seed, set(bad)),
        DaliValLoader(val, spec, cfg, env, batch_size, set(bad)),
        classes,
    )
