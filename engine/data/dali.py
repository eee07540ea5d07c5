"""The DALI loader: DALI's file reader -> decode -> crop/resize -> crop_mirror_normalize in one pipeline per
split, on the GPU ("mixed" decode) for a CUDA device, with DALI's CPU operators (device_id=None) otherwise.

Reading and order. fn.readers.file reads the split's file list (hcd.engine.data.folder's folder scan or list
file, handed over as `files`; each file's DALI label is its position in that list, and the class labels are
looked up on the host) and shards it as DALI does: rank r reads the slice [floor(r n / W), floor((r+1) n / W))
of the list (n files, W ranks; shard_id = rank, num_shards = world size).
  Train: shuffle_after_epoch, with shuffle_after_epoch_seed from cfg.seed (the same on every rank): DALI
  permutes the whole list every epoch (epoch 0 included), so the ranks' slices are disjoint and reshuffled
  each epoch. This is DALI's order, not hcd.engine.data.sampler's: the DALI and torch loaders no longer see the
  same batches. The epoch length per rank is still the torch loader's, n // W samples, so the step count and
  the schedule are what the trainer computes: a rank takes the first n // W samples of its slice (a slice one
  longer drops its last, another sample each epoch) and len = ceil or floor of n // W / batch_size
  (data.last_batch). pad_last_batch keeps DALI's epochs aligned with ours: each reader epoch is
  ceil(ceil(n / W) / batch_size) batches on every rank, the last padded with repeats of its last sample, and
  the batches past ours (a dropped remainder, padding) are run and discarded before the next epoch starts.
  Val: no shuffling, stick_to_shard: rank r's slice in list order once per pass (num_samples = its size, so
  ranks differ by one sample at most, as with the torch loader's r::W), padding trimmed.
Augmentation. Train: decoders.image_random_crop (random-resized-crop window: area 0.08-1, ratio 3/4-4/3,
decoded as a region of interest) -> resize to img_size x img_size with data.train_interpolation (random: a
per-sample fn.random.choice of linear and cubic, timm's meaning) -> flip p=0.5 -> normalise; DALI's
generators seeded per (cfg.seed, rank, split). Val: decode -> shorter side to floor(img_size / crop_pct) ->
centre crop -> normalise, bilinear. Antialiased (as the torch loader). data.auto_augment: DALI's RandAugment on
the resized uint8 image (auto_augment.py: timm's op list, what differs; timm flips first: same distribution).

Resume (exact). The pipeline runs with enable_checkpointing=True and the loader keeps pipe.checkpoint() after
every batch (DALI's serialized state: the reader's position and shuffle, every random generator; a few hundred
bytes, ~20 us). state_dict() returns it with the (epoch, batch) it stands at; the trainer stores it in every
rank's checkpoint file and hands it back through load_state_dict() on --resume, so the resumed pipeline yields
the batches (files, crops, flips) the uninterrupted one would have. set_epoch(e, b) positions the pipeline:
the live pipeline continues, or the latest saved state at or before (e, b) (the loaded one, or the start of
an epoch this loader gave) is restored, then batches are run and discarded up to b. Without any such state (a
checkpoint from another world size, the torch loader, or before this loader) a fresh pipeline is counted as
epoch e: the order then differs from the uninterrupted run's (logged as a warning).

Corrupt files. DALI's reader hands us no bytes before decoding and its decoder errors name neither file nor
sample, and nothing is read up front (a header scan of ImageNet's 1.3 M files would cost every start minutes on
a network file system). When a batch fails, the pipeline is rebuilt from the state before that batch with
every file replaced by a small valid image (same operators, so DALI's state restores and the reader gives the
same file indices): that names the batch's files, which PIL then decodes to find the culprits. on_corrupt:
error raises DataError naming the first; skip puts the placeholder in the culprits' place in the list (their
samples are dropped on the host, so batches get shorter, as with the torch loader) and continues from the same
state. A failing batch whose files PIL all decodes is a RuntimeError naming its first file.

Output dtype: float32, or float16 for a 16-bit run (crop_mirror_normalize writes it: half the copy and the
host-to-device bytes). DALI 2.4 has no bfloat16: bf16 runs get float16 from DALI, cast to bfloat16 on the device.

DALI is imported inside the functions only: the engine imports without it.
"""
import logging
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hcd.engine.data.auto_augment import dali_rand_augment, parse_rand_augment
from hcd.engine.data.base import ShardedLoader
from hcd.engine.data.corrupt import file_problem, pipeline_error_reason, placeholder_jpeg

log = logging.getLogger("hcd.data")
READER = "reader"


def build_pipeline(spec, *, train: bool, files: list, batch_size: int, num_threads: int, device_id, seed: int,
                   shuffle_seed: int, shard_id: int, num_shards: int, half: bool, checkpoint=None):
    """One built, checkpointing DALI pipeline: outputs (images, index of each sample's file in `files`)."""
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "cpu" if device_id is None else "mixed"
    s = spec.img_size
    aug = parse_rand_augment(spec.auto_augment) if train and spec.auto_augment else None
    order = (dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed) if train
             else dict(stick_to_shard=True))

    def graph():  # DALI's RandAugment picks ops with `if` on data: conditionals, only on when it is used
        encoded, index = fn.readers.file(name=READER, files=files, labels=list(range(len(files))),
                                         shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, **order)
        if train:
            img = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                                random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                num_attempts=10)
            mirror = fn.random.coin_flip(probability=0.5)
            # data.train_interpolation per sample (a choice of one when fixed: the same operators, so crops and
            # flips do not depend on it); DALI's resize takes interp_type as a per-sample argument
            interp = fn.random.choice(train_interp_types(spec.train_interpolation, types))
            img = fn.resize(img, size=[s, s], interp_type=interp, antialias=True)
            if aug is not None:  # data.auto_augment, on the resized uint8 image (auto_augment.py)
                img = dali_rand_augment(img, aug, s)
        else:
            img = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=spec.val_resize, interp_type=types.INTERP_LINEAR,
                            antialias=True)
            mirror = 0
        out = fn.crop_mirror_normalize(img, dtype=types.FLOAT16 if half else types.FLOAT,
                                       output_layout="HWC" if spec.channels_last else "CHW",
                                       crop=[s, s], mirror=mirror,
                                       mean=[m * 255 for m in spec.mean], std=[v * 255 for v in spec.std])
        return out, index
    pipe = pipeline_def(graph, enable_conditionals=aug is not None)(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
        enable_checkpointing=True, checkpoint=checkpoint or None)
    pipe.build()
    return pipe


def train_interp_types(mode: str, types) -> list:
    """DALI's interpolation types for data.train_interpolation; random: timm's bilinear-or-bicubic choice."""
    return {"bilinear": [types.INTERP_LINEAR], "bicubic": [types.INTERP_CUBIC],
            "random": [types.INTERP_LINEAR, types.INTERP_CUBIC]}[mode]


class DaliLoader(ShardedLoader):
    backend = "dali"

    def __init__(self, split, spec, **kw):
        super().__init__(split, spec, **kw)
        n, w, r, bs = len(split), self.world_size, self.rank, self.batch_size
        if not self.train:  # DALI's contiguous shard, whole
            self.num_samples = n * (r + 1) // w - n * r // w
            self._len = -(-self.num_samples // bs)
        padded_shard = -(-n // w)  # pad_last_batch pads every rank's slice to the longest, then to whole batches
        self._reader_batches = -(-padded_shard // bs)  # batches per reader epoch, on every rank
        if self.device.type == "cuda":
            self._device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self._device_id = None
        seq = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, r, int(self.train)])
        self._dali_seed = int(seq.generate_state(1)[0] & 0x7FFFFFFF)
        self._shuffle_seed = int(np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF]).generate_state(1)[0]
                                 & 0x7FFFFFFF)  # the same on every rank: one permutation per epoch
        self._files = list(split.paths)  # corrupt files replaced by the placeholder (skip)
        self._bad_idx = np.zeros(0, dtype=np.int64)
        self._placeholder = None
        self._pipe = None
        self._pos = None      # (epoch, batches of that reader epoch given out) of the live pipeline
        self._last = None     # (pos, DALI checkpoint) after the live pipeline's last batch; b"" = fresh
        self._anchors = {}    # epoch -> (pos, checkpoint) at its start, as this loader last gave it
        self._loaded = None   # (pos, checkpoint) from load_state_dict
        self._pass = None
        self._warned = False

    # ---------------------------------------------------------------------------------------- pipeline

    def _build(self, files, checkpoint):
        return build_pipeline(self.spec, train=self.train, files=files, batch_size=self.batch_size,
                              num_threads=max(1, self.num_workers), device_id=self._device_id,
                              seed=self._dali_seed, shuffle_seed=self._shuffle_seed, shard_id=self.rank,
                              num_shards=self.world_size, half=self.dtype != torch.float32, checkpoint=checkpoint)

    def _restore(self, pos, checkpoint):
        """The live pipeline: built from `checkpoint` (b"": fresh), standing at `pos`."""
        self._pipe = None  # a failed build leaves no pipeline behind
        self._pipe = self._build(self._files, checkpoint)
        self._pos = pos
        self._last = (pos, checkpoint)
        if pos[1] == 0:
            self._anchors[pos[0]] = self._last

    def _advance(self, pos):
        e, b = pos[0], pos[1] + 1
        if b < self._reader_batches:
            return e, b
        return (e + 1 if self.train else 0), 0  # val passes all read the same reader epoch

    def _seek(self, target):
        """Make the live pipeline's next batch `target` (epoch, batch)."""
        if self._pipe is not None and self._pos == target:
            return
        saved = [s for s in (*self._anchors.values(), self._loaded) if s is not None and s[0] <= target]
        best = max(saved, key=lambda s: s[0], default=None)
        if self._pipe is None:
            live = False
        elif self.train:  # forward from where it stands, unless a saved state is nearer
            live = self._pos <= target and (best is None or best[0] <= self._pos)
        else:  # val: every pass reads the same reader epoch; wrapping past a padded tail is cheap
            live = self._pos[1] <= target[1] or self._pos[1] >= self._len
        if not live and best is not None:
            self._restore(*best)
        elif not live:
            if self.train and target[0] > 0 and not self._warned:
                log.warning("DALI loader: no saved reader state at or before epoch %d batch %d (a checkpoint "
                            "without it, or from another world size): a fresh pipeline counts as epoch %d, so "
                            "the order differs from an uninterrupted run's", target[0], target[1], target[0])
                self._warned = True
            self._restore((target[0] if self.train else 0, 0), b"")
        while self._pos != target:
            self._next()

    def _next(self):
        """Run the live pipeline one batch: (images on the host or device in DALI's dtype, file indices)."""
        while True:
            try:
                images, index = self._pipe.run()
                break
            except Exception as e:  # DALI raises RuntimeError; the pipeline is unusable after it
                self._recover(e)
        out = self._to_torch(images), np.asarray(index.as_tensor()).reshape(-1).astype(np.int64)
        self._pos = self._advance(self._pos)
        self._last = (self._pos, self._pipe.checkpoint())
        if self._pos[1] == 0:
            self._anchors[self._pos[0]] = self._last
        return out

    def _recover(self, err: BaseException):
        """The live pipeline failed on its next batch: name that batch's files (a probe pipeline restored from
        the state before it, every file replaced by the placeholder), find the bad ones with PIL, then raise
        (error) or replace them in the list and rebuild the pipeline at the same state (skip)."""
        self._pipe = None
        pos, checkpoint = self._last
        if self._placeholder is None:
            self._placeholder = placeholder_jpeg()
            weakref.finalize(self, os.unlink, self._placeholder)
        probe = self._build([self._placeholder] * len(self._files), checkpoint)
        idx = np.unique(np.asarray(probe.run()[1].as_tensor()).reshape(-1))
        del probe
        idx = [int(i) for i in idx if self._files[i] != self._placeholder]
        paths = [self.split.paths[i] for i in idx]
        with ThreadPoolExecutor(max(1, min(8, len(paths)))) as pool:
            problems = list(pool.map(file_problem, paths))
        if all(p is None for p in problems):  # not a bad file: out of memory, unsupported variant, a bug
            raise RuntimeError(f"DALI failed on a batch with {paths[0] if paths else '?'}, which PIL decodes: "
                               f"{pipeline_error_reason(err)}") from err
        for i, path, p in zip(idx, paths, problems):
            if p is not None:
                self.policy.report(path, p, count=False)  # raises with on_corrupt: error
                self._files[i] = self._placeholder
                self._bad_idx = np.union1d(self._bad_idx, [i])
        self._restore(pos, checkpoint)

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = out.as_tensor()
        dtype = torch.float32 if self.dtype == torch.float32 else torch.float16
        if self._device_id is None:
            images = torch.empty(dense.shape(), dtype=dtype)
            feed_ndarray(dense, images)  # a copy: DALI reuses its output buffer
        else:
            # Copy on a side stream and wait for that copy only (not for the training step queued on
            # the current stream), so DALI can reuse its buffer right away; record_stream keeps the
            # caching allocator from handing the memory out again while the trainer still reads it.
            if getattr(self, "_copy_stream", None) is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                images = torch.empty(dense.shape(), dtype=dtype, device=self.device)
                feed_ndarray(dense, images, cuda_stream=self._copy_stream)
            self._copy_stream.synchronize()
            images.record_stream(torch.cuda.current_stream(self.device))
        if self.spec.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW = channels-last strides
        return images

    # ------------------------------------------------------------------------------------------ passes

    def __iter__(self):
        token = self._pass = object()
        self._seek((self.epoch if self.train else 0, self.start_batch))
        for b in range(self.start_batch, len(self)):
            if self._pass is not token:
                raise RuntimeError("a newer pass over this loader started; this iterator is finished")
            images, idx = self._next()
            k = min(self.batch_size, self.num_samples - b * self.batch_size)  # padding, a rank's extra sample
            images, idx = images[:k], idx[:k]
            if self._bad_idx.size:
                keep = ~np.isin(idx, self._bad_idx)
                if not keep.all():
                    if not keep.any():
                        raise self.policy.all_bad(self.split.paths[idx[0]])
                    self.policy.skipped += int((~keep).sum())
                    images, idx = images[torch.from_numpy(keep).to(images.device)], idx[keep]
            yield images.to(self.device, non_blocking=True).to(self.dtype), self.labels(idx)

    # ------------------------------------------------------------------------------------------- state

    def _identity(self) -> dict:
        return {"files": len(self.split), "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "batch_size": self.batch_size, "train": self.train,
                "train_interpolation": self.spec.train_interpolation,  # the pipeline's operators
                "auto_augment": self.spec.auto_augment if self.train else None}

    def state_dict(self):
        """DALI's state after the last batch given out, with its (epoch, batch); None before the first."""
        if self._last is None:
            return None
        return {"backend": self.backend, **self._identity(), "position": list(self._last[0]),
                "dali": self._last[1]}

    def load_state_dict(self, state) -> None:
        if not state:
            return
        mine = self._identity()
        if state.get("backend") != self.backend or any(state.get(k) != v for k, v in mine.items()):
            log.warning("DALI loader: the saved loader state is not this loader's (%s); not restored",
                        ", ".join(f"{k} {state.get(k)} -> {v}" for k, v in mine.items() if state.get(k) != v)
                        or f"backend {state.get('backend')}")
            return
        self._loaded = (tuple(state["position"]), state["dali"])
