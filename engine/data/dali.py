"""The DALI loader: file bytes read by us (in the order hcd.engine.data.sampler gives) -> fn.external_source
-> decode -> crop/resize -> crop_mirror_normalize, on the GPU ("mixed" decode) for a CUDA device, with
DALI's CPU operators (device_id=None) otherwise.

Train: decoders.image_random_crop (random-resized-crop window: area 0.08-1, ratio 3/4-4/3, decoded as a
region of interest) -> resize to img_size x img_size -> flip p=0.5 -> normalise. Val: decode -> shorter
side to floor(img_size / crop_pct) -> centre crop -> normalise. Bilinear, antialiased (as the torch loader).

Sharding and shuffling are ours, not DALI's, so the order is the torch loader's and start_batch skips
batches without reading them. Augmentation randomness is DALI's, seeded per (seed, rank, split): it is
reproducible for a whole run from the start, not across a mid-epoch resume.

Corrupt files: a file whose first bytes are no known image signature, or that cannot be read, is handled
before DALI sees it. A decoder failure inside DALI names no file, so the batches in flight are decoded
again one file at a time with PIL to find the culprit(s); then either DataError (on_corrupt: error), or
the culprits are dropped, a fresh pipeline is built (DALI's is unusable after an error) and the batches
are fed again (on_corrupt: skip).

DALI is imported inside the functions only: the engine imports without it.
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hcd.engine.data.base import ShardedLoader
from hcd.engine.data.corrupt import decode_problem, looks_like_image, short_reason

# One batch in DALI at a time (prefetch_queue_depth=1): it decodes batch k+1 while the trainer works on
# batch k, and a decode error then always belongs to that one batch. File reads run READ_AHEAD batches
# ahead in a thread pool, so DALI never waits for the disk.
READ_AHEAD = 2


def build_pipeline(spec, train: bool, batch_size: int, num_threads: int, device_id, seed: int, hwc: bool):
    """One built DALI pipeline with an external source named "encoded" (one uint8 array per file)."""
    from nvidia.dali import Pipeline, fn, types

    decode_device = "cpu" if device_id is None else "mixed"
    s = spec.img_size
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=1)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        if train:
            img = fn.decoders.image_random_crop(encoded, device=decode_device, output_type=types.RGB,
                                                random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                num_attempts=10)
            img = fn.resize(img, size=[s, s], interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            img = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
            img = fn.resize(img, resize_shorter=spec.val_resize, interp_type=types.INTERP_LINEAR,
                            antialias=True)
            mirror = 0
        out = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="HWC" if hwc else "CHW",
                                       crop=[s, s], mirror=mirror,
                                       mean=[m * 255 for m in spec.mean], std=[v * 255 for v in spec.std])
        pipe.set_outputs(out)
    pipe.build()
    return pipe


def read_encoded(path: str):
    """(bytes as a uint8 array, None) or (None, reason)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        return None, short_reason(e)
    if not looks_like_image(data[:16].tobytes()):
        return None, "not an image (unknown file signature)" if data.size else "empty file"
    return data, None


def _dali_reason(err: BaseException) -> str:
    # DALI's message starts with "Critical error in pipeline:" lines; the operator's own line is useful.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith("Critical error")]
    return (useful or lines or [type(err).__name__])[0]


class DaliLoader(ShardedLoader):
    backend = "dali"

    def __init__(self, split, spec, **kw):
        super().__init__(split, spec, **kw)
        if self.device.type == "cuda":
            self._device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self._device_id = None
        seq = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, self.rank, int(self.train)])
        self._dali_seed = int(seq.generate_state(1)[0] & 0x7FFFFFFF)
        self._pipe = None
        self._pool = None
        self._pass = None     # token of the pass using the pipeline
        self._dirty = False   # a pass stopped before draining the pipeline (break, error)

    # ---------------------------------------------------------------------------------------- pipeline

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.spec, self.train, self.batch_size, max(1, self.num_workers),
                                        self._device_id, self._dali_seed, self.spec.channels_last)
        return self._pipe

    def _discard_pipeline(self):
        # Runs still scheduled in it belong to an abandoned or failed pass: start clean next time.
        self._pipe = None

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, self.num_workers), thread_name_prefix="hcd-read")
        return self._pool

    # ------------------------------------------------------------------------------------------ batches

    def _start_reads(self, idx: np.ndarray):
        return idx, [self._threads().submit(read_encoded, self.split.paths[i]) for i in idx]

    def _finish_reads(self, pending):
        """(idx, encoded arrays) of a batch; unreadable / non-image files go through the policy."""
        idx, futures = pending
        keep, arrays = [], []
        for i, fut in zip(idx, futures):
            data, reason = fut.result()
            if reason is None:
                keep.append(i)
                arrays.append(data)
            else:
                self.policy.report(self.split.paths[i], reason)  # raises with on_corrupt: error
        if not keep:
            raise self.policy.all_bad(self.split.paths[idx[0]])
        return np.array(keep, dtype=np.int64), arrays

    def _schedule(self, item):
        pipe = self._pipeline()
        pipe.feed_input("encoded", item[1])
        pipe.schedule_run()

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        dense = out.as_tensor()
        if self._device_id is None:
            images = torch.empty(dense.shape(), dtype=torch.float32)
            feed_ndarray(dense, images)  # a copy: DALI reuses its output buffer for the next batch
        else:
            # Copy on a side stream and wait for that copy only (not for the training step queued on
            # the current stream), so DALI can reuse its buffer right away; record_stream keeps the
            # caching allocator from handing the memory out again while the trainer still reads it.
            if getattr(self, "_copy_stream", None) is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                images = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
                feed_ndarray(dense, images, cuda_stream=self._copy_stream)
            self._copy_stream.synchronize()
            images.record_stream(torch.cuda.current_stream(self.device))
        if self.spec.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW = channels-last strides
        return images.to(self.device, non_blocking=True)

    def _recover(self, item, err: BaseException):
        """DALI failed on the batch in flight: find its bad files with PIL, then raise (error) or drop
        them and run the rest in a fresh pipeline (skip; DALI's is unusable after an error)."""
        self._discard_pipeline()
        idx, arrays = item
        problems = list(self._threads().map(lambda a: decode_problem(a.tobytes()), arrays))
        if all(p is None for p in problems):  # not a bad file: out of memory, unsupported variant, a bug
            raise RuntimeError(f"DALI failed on a batch starting with {self.split.paths[idx[0]]}, "
                               f"which PIL decodes: {_dali_reason(err)}") from err
        for i, p in zip(idx, problems):
            if p is not None:
                self.policy.report(self.split.paths[i], p)  # raises with on_corrupt: error
        keep = [k for k, p in enumerate(problems) if p is None]
        if not keep:
            raise self.policy.all_bad(self.split.paths[idx[0]])
        item = (idx[keep], [arrays[k] for k in keep])
        self._schedule(item)
        return item

    def __iter__(self):
        token = self._pass = object()
        if self._dirty:
            self._discard_pipeline()
        self._dirty = True  # until this pass drains the pipeline
        plan = iter(self.plan())
        reads = deque()

        def schedule_next():
            while len(reads) < READ_AHEAD and (b := next(plan, None)) is not None:
                reads.append(self._start_reads(b))
            if not reads:
                return None
            item = self._finish_reads(reads.popleft())
            try:
                self._schedule(item)
            except Exception as e:
                item = self._recover(item, e)
            if (b := next(plan, None)) is not None:  # keep the disk busy while DALI decodes
                reads.append(self._start_reads(b))
            return item

        item = schedule_next()
        while item is not None:
            if self._pass is not token:
                raise RuntimeError("a newer pass over this loader started; this iterator is finished")
            try:
                pipe = self._pipeline()
                (out,) = pipe.share_outputs()
                images = self._to_torch(out)
                pipe.release_outputs()
            except Exception as e:
                item = self._recover(item, e)
                continue
            idx = item[0]
            item = schedule_next()
            yield images, self.labels(idx)
        self._dirty = False
