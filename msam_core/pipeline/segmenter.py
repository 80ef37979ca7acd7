"""The one object that turns a volume plus prompts into masks (used by the CLI and the worker).

Typical use::

    loaded = load_model("msam_default.safetensors")          # network + pipeline options
    seg = Segmenter(loaded.network, loaded.options, device="cpu", cache=DictEmbeddingCache())
    result = seg.segment(volume, points=[Point((10.0, -20.0, 35.0), space="RAS")])
    result.labels  # uint8 on volume's grid: 0 background, k = lesion k

``msam segment``, the worker, ``msam evaluate`` and ``msam calibrate`` all build their Segmenter
from a :class:`~msam_core.checkpoints.LoadedModel` this way, and all reach the network through
:meth:`Segmenter.open_crop` and :meth:`Segmenter.click`: a pipeline step added there is added for
every caller. Whoever needs to watch the work (the worker times stages, cancels jobs and reports
progress) passes :class:`SegmenterHooks`; nobody wraps the network.

The steps are public so a service can split and cache them, nnInteractive-session style:
:meth:`Segmenter.sampler` (wrap a volume once) -> :meth:`Segmenter.open_crop` (a 128^3 crop, its
embedding under the cache key ``model_id:sha256(crop)`` in an optional :class:`EmbeddingCache`,
and the state of one lesion's interaction on it) -> :meth:`Segmenter.click` (decoder, decision
threshold, stable-region prior, boundary refinement, coarse view) ->
:mod:`~msam_core.pipeline.postprocess`. A follow-up click on the same lesion keeps the crop
centred on the *first* positive click, so it hits the cache and costs only a decoder pass.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from msam_core.errors import InvalidPrompt
from msam_core.io.volume import Volume
from msam_core.model.decode_cache import DecodeCache
from msam_core.pipeline.boundary import refine_boundary, walk_reach
from msam_core.pipeline.coarse_view import choose, coarse_grid, fine_reach, low_res_to_fine, points_to_coarse
from msam_core.pipeline.postprocess import (BACKGROUND_LOGIT, Box3, bbox_slices, clip_to_box,
                                            combine_lesions, logits_to_volume_grid, positive_mask, union_box,
                                            upsample_logits, upsample_reach)
from msam_core.pipeline.preprocess import (CropGrid, IntensityProfile, VolumeSampler, mask_on_grid,
                                            mask_to_logits)
from msam_core.pipeline.options import PipelineOptions
from msam_core.pipeline.prompts import Box, LesionPrompt, Point, resolve_prompts
from msam_core.pipeline.region_prior import RegionPrior, add_prior
from msam_core.pipeline.windows import (LogitCanvas, Offset, neighbour, seed_from_known,
                                        touched_faces, window_grid)

MAX_ITERATIONS = 20

_BACKGROUND: concurrent.futures.ThreadPoolExecutor | None = None


def _background() -> concurrent.futures.ThreadPoolExecutor:
    """A thread of this process that grows the stable regions of a click's positive clicks
    (SimpleITK, which releases the GIL) while the decoder runs on the main thread."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="msam-click")
    return _BACKGROUND


def _forget_background() -> None:
    global _BACKGROUND
    _BACKGROUND = None  # a forked child (a prefork worker) has no thread of its parent's pool


os.register_at_fork(after_in_child=_forget_background)


class PromptableModel(Protocol):
    """What the pipeline needs from a network (``msam_core.model.MSAM`` satisfies it)."""

    img_size: int
    model_id: str

    def encode(self, image: torch.Tensor) -> torch.Tensor: ...

    def decode(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None, cache: DecodeCache | None = None) -> torch.Tensor: ...

    def refine(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
               mask_logits: torch.Tensor | None = None, iterations: int = 1) -> torch.Tensor: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...


#: The stages :class:`SegmenterHooks` hear about: image embeddings, decoder passes, stable-region
#: growing and the boundary walker.
STAGES = ("encode", "decode", "prior", "boundary")


class SegmenterHooks:
    """What a :class:`Segmenter` tells whoever runs it; every method is a no-op here.

    Subclass and override: the worker checks for cancellation in :meth:`before` (an exception
    raised there stops the request before the stage starts), times the stages in :meth:`after`
    and reports progress in :meth:`lesion_done`. The ``prior`` stage runs in a thread of the
    Segmenter's beside the caller's (its calls come from there).
    """

    def before(self, stage: str) -> None:
        """A stage of :data:`STAGES` is about to run."""

    def after(self, stage: str, seconds: float) -> None:
        """A stage finished after ``seconds`` (device work included: CUDA is synchronised)."""

    def lesion_done(self, done: int, total: int) -> None:
        """``done`` of a request's ``total`` lesions are segmented."""


class StageTimer(SegmenterHooks):
    """Hooks that add up each stage's seconds and count its runs (``runs["encode"]``: encoder
    passes, cache misses only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {name: 0.0 for name in STAGES}
        self.runs: dict[str, int] = {name: 0 for name in STAGES}

    def after(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.runs[stage] = self.runs.get(stage, 0) + 1


class EmbeddingCache(Protocol):
    """Where embeddings are kept between requests (the worker backs it with Redis)."""

    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, embedding: torch.Tensor) -> None: ...


class DictEmbeddingCache:
    """An in-process :class:`EmbeddingCache` (LRU over ``max_items``), for tests and the CLI."""

    def __init__(self, max_items: int = 16) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: str, embedding: torch.Tensor) -> None:
        self._items[key] = embedding
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Window:
    """One network input.

    Attributes:
        grid: where the crop lies (128^3, 1.5 mm, RAS axes).
        offset: position on the lesion's window lattice (half-window steps).
        image: normalised crop, ``float32 [1, 1, 128, 128, 128]`` in ``[a, b, c]`` (R, A, S) order.
    """

    grid: CropGrid
    offset: Offset
    image: torch.Tensor


@dataclass
class CoarseView:
    """One window seen at twice the spacing (:mod:`~msam_core.pipeline.coarse_view`).

    Attributes:
        fine: the window's own grid.
        grid: the coarse grid: same size and centre, twice the spacing.
        image: the coarse crop, ``float32 [1, 1, S, S, S]``.
        embedding: its image embedding.
        decoded: what its decoder passes keep for the next click: the regions grown from its
            clicks, the adapter's output (:class:`~msam_core.model.decode_cache.DecodeCache`).
    """

    fine: CropGrid
    grid: CropGrid
    image: torch.Tensor
    embedding: torch.Tensor
    decoded: DecodeCache = field(default_factory=DecodeCache)


@dataclass
class CropState:
    """One lesion's interaction on one crop, kept across its clicks (:meth:`Segmenter.open_crop`).

    Attributes:
        image: the normalised crop ``float32 [1, 1, S, S, S]``.
        grid: where it lies (RAS-aligned, crop voxel indices ``(a, b, c)``).
        embedding: its image embedding.
        cache_hit: whether the embedding came from the cache.
        coarse: its coarse view, when the options turn it on.
        prior: the stable regions of its clicks, grown once each (created at the first click that
            needs it).
        low_res: the network's logits at the last click ``[1, 1, 32, 32, 32]`` (calibrated units),
            the next click's mask prompt when it asks for feedback.
        decoded: what the decoder passes on this crop keep for the next click
            (:class:`~msam_core.model.decode_cache.DecodeCache`: a follow-up click grows only its
            own click's region, and without a mask prompt does not run the adapter again).
    """

    image: torch.Tensor
    grid: CropGrid
    embedding: torch.Tensor
    cache_hit: bool = False
    coarse: CoarseView | None = None
    prior: RegionPrior | None = None
    low_res: torch.Tensor | None = None
    decoded: DecodeCache = field(default_factory=DecodeCache)


@dataclass
class ClickAnswer:
    """The network's answer to one click on one crop (:meth:`Segmenter.answer`), before the steps
    at full resolution.

    Attributes:
        fine: the crop's network logits ``[1, 1, r, r, r]`` (calibrated units).
        coarse: the coarse view's, when the options turn it on.
        region: the union of the positive clicks' stable regions ``bool [S, S, S]``, when the
            prior is on and a click has one.
    """

    fine: torch.Tensor
    coarse: torch.Tensor | None = None
    region: np.ndarray | None = None


@dataclass
class LesionOutcome:
    """What happened for one lesion (no image content: safe to log)."""

    lesion: int
    windows: int
    cache_hits: int
    voxels: int = 0
    stopped_at_limit: bool = False


@dataclass
class SegmentationResult:
    """Output of :meth:`Segmenter.segment`.

    Attributes:
        labels: ``uint8`` label mask on the input grid (shape of the input; 0 = background,
            ``k`` = lesion ``k``).
        lesions: per-lesion facts.
        model_id: the network that produced it.
        intensity: what the input's values were taken to be (CT in HU or not, and why).
    """

    labels: np.ndarray
    lesions: list[LesionOutcome] = field(default_factory=list)
    model_id: str = ""
    intensity: IntensityProfile | None = None


def grid_key(model_id: str, source: str, grid: CropGrid) -> str:
    """Cache key of an embedding of a crop of a known volume: the model, the volume's immutable
    name (``source``, e.g. a stored volume's id) and the crop's grid (origin in RAS mm, size,
    spacing). The crop is a function of these, so no digest of its 8 MB is needed."""
    origin = ",".join(f"{v:.4f}" for v in grid.origin_ras)
    return f"{model_id}:grid:{source}:{origin}:{grid.size}:{grid.spacing:g}"


def crop_key(model_id: str, image: torch.Tensor) -> str:
    """Cache key of an embedding: the model and the exact crop content (shape, dtype, bytes)."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy()
    digest = hashlib.sha256()
    digest.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(memoryview(data).cast("B"))
    return f"{model_id}:{digest.hexdigest()}"


class Segmenter:
    """Runs a promptable model on volumes.

    Args:
        model: the network (see :class:`PromptableModel`).
        options: the pipeline's settings around it, as the checkpoint states them
            (:class:`~msam_core.checkpoints.LoadedModel`'s ``options``).
        device: ``"cpu"`` or ``"cuda"``; crops and prompts are moved there.
        cache: optional embedding cache shared across requests.
        max_windows: most 128^3 windows spent on one lesion (large-lesion following).
        hooks: told before and after every stage and after every lesion (default: nobody).
    """

    def __init__(self, model: PromptableModel, options: PipelineOptions, device: str | torch.device = "cpu",
                 cache: EmbeddingCache | None = None, max_windows: int = 8,
                 hooks: SegmenterHooks | None = None) -> None:
        if max_windows < 1:
            raise ValueError("max_windows must be >= 1")
        if not isinstance(options, PipelineOptions):
            raise TypeError(f"options must be PipelineOptions (the checkpoint's, from load_model), got "
                            f"{type(options).__name__}")
        self.model = model
        self.options = options
        self.device = torch.device(device)
        self.cache = cache
        self.max_windows = max_windows
        self.hooks = hooks if hooks is not None else SegmenterHooks()

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        self.hooks.before(name)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.hooks.after(name, time.perf_counter() - start)

    # -- steps --------------------------------------------------------------------------------
    def sampler(self, volume: Volume) -> VolumeSampler:
        """Wrap ``volume`` once for all crops cut from it."""
        return VolumeSampler(volume)

    def prepare(self, sampler: VolumeSampler, lesion: LesionPrompt,
                offset: Offset = (0, 0, 0)) -> Window:
        """The window ``offset`` of ``lesion`` (``(0, 0, 0)``: centred on its first prompt)."""
        grid = window_grid(CropGrid.centred(lesion.center_ras, size=self.model.img_size), offset)
        return Window(grid=grid, offset=offset, image=sampler.crop(grid))

    def encode(self, image: torch.Tensor,
               cache: EmbeddingCache | None = None) -> tuple[torch.Tensor, str]:
        """``[1, 1, 128, 128, 128]`` crop -> ``(embedding [1, C, 8, 8, 8], cache key)``.

        The key is ``model_id:sha256(crop)``; ``cache`` (default: the Segmenter's own) is asked
        first and given the embedding after a miss.
        """
        embedding, key, _ = self._encode(image, cache)
        return embedding, key

    def _encode(self, image: torch.Tensor, cache: EmbeddingCache | None = None,
                key: str | None = None) -> tuple[torch.Tensor, str, bool]:
        cache = cache if cache is not None else self.cache
        key = key if key is not None else crop_key(self.model.model_id, image)
        if cache is not None:
            cached = cache.get(key)
            if cached is not None:
                return cached.to(self.device), key, True
        with self._stage("encode"), torch.inference_mode(), self.model.autocast():
            embedding = self.model.encode(image.to(self.device))
        if cache is not None:
            cache.put(key, embedding)
        return embedding, key, False

    def coarse_view(self, sampler: VolumeSampler | None, grid: CropGrid,
                    image: torch.Tensor | None = None, source: str | None = None) -> CoarseView | None:
        """The coarse view of the window on ``grid`` when the options turn it on
        (``PipelineOptions.coarse_view``), else ``None``. ``image``: the coarse crop when already
        cut (default: cut from ``sampler``); its embedding goes through the cache as any other
        (``source``: see :func:`grid_key`)."""
        if not self.options.coarse_view:
            return None
        coarse = coarse_grid(grid)
        image = sampler.crop(coarse) if image is None else image
        key = None if source is None else grid_key(self.model.model_id, source, coarse)
        embedding, _, _ = self._encode(image, key=key)
        return CoarseView(fine=grid, grid=coarse, image=image, embedding=embedding)

    def predict(self, embedding: torch.Tensor, points_crop: np.ndarray, labels: np.ndarray,
                mask_logits: torch.Tensor | None = None, iterations: int = 1,
                decode_cache: DecodeCache | None = None) -> torch.Tensor:
        """Decoder pass(es), in calibrated units: the network's logits minus the options'
        ``mask_threshold`` (a mask prompt is shifted back before the network sees it).

        Args:
            embedding: from :meth:`encode`.
            points_crop: ``(N, 3)`` continuous crop voxel indices ``(a, b, c)``.
            labels: ``(N,)`` 1 positive / 0 negative.
            mask_logits: optional mask prompt ``[1, 1, 32, 32, 32]`` (calibrated units).
            iterations: 1 = one decoder pass; more feeds each prediction back as the mask prompt.
            decode_cache: what earlier passes on this embedding kept (one pass: reused, and what
                this one computes kept; the logits are the same as computed afresh).

        Returns:
            logits ``float32 [1, 1, 32, 32, 32]`` on the CPU, ``> 0`` = lesion.
        """
        points = torch.as_tensor(np.asarray(points_crop, np.float32).reshape(1, -1, 3), device=self.device)
        lab = torch.as_tensor(np.asarray(labels, np.int64).reshape(1, -1), device=self.device)
        threshold = self.options.mask_threshold
        mask = None if mask_logits is None else mask_logits.to(self.device) + threshold
        with self._stage("decode"), torch.inference_mode(), self.model.autocast():
            if iterations == 1:
                out = self.model.decode(embedding, points, lab, mask, cache=decode_cache)
            else:
                out = self.model.refine(embedding, points, lab, mask, iterations=iterations)
            out = out.float().cpu()
        return out - threshold if threshold else out

    def open_crop(self, image: torch.Tensor, grid: CropGrid, *, sampler: VolumeSampler | None = None,
                  coarse_image: torch.Tensor | None = None, prior: RegionPrior | None = None,
                  source: str | None = None) -> CropState:
        """Start one lesion's interaction on the crop ``image`` (``[1, 1, S, S, S]``, on ``grid``):
        its embedding (through the cache) and, when the options turn it on, its coarse view, cut
        from ``sampler`` or given as ``coarse_image``. ``prior``: a
        :class:`~msam_core.pipeline.region_prior.RegionPrior` of ``image`` to share (default: one
        is made at the first click that needs it). ``source``: an immutable name of the volume
        the crop was cut from; the cache key is then :func:`grid_key` (no digest of the crop)."""
        key = None if source is None else grid_key(self.model.model_id, source, grid)
        embedding, _, hit = self._encode(image, key=key)
        coarse = self.coarse_view(sampler, grid, coarse_image, source) if self.options.coarse_view else None
        return CropState(image=image, grid=grid, embedding=embedding, cache_hit=hit, coarse=coarse, prior=prior)

    def _prior_region(self, state: CropState, points_crop: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """The union of the stable regions of the positive clicks (the crop's prior made at the
        first click that needs it)."""
        with self._stage("prior"):
            if state.prior is None:
                state.prior = self.new_prior(state.image)
            return state.prior.mask(points_crop, labels)

    def new_prior(self, image: torch.Tensor) -> RegionPrior:
        """A :class:`~msam_core.pipeline.region_prior.RegionPrior` of the crop ``image`` at the
        bound the options' weights were chosen at."""
        return RegionPrior(image.detach().cpu().numpy(), self.options.prior_max_voxels)

    def click(self, state: CropState, points_crop: np.ndarray, labels: np.ndarray,
              mask_prompt: torch.Tensor | None = None, iterations: int = 1, feedback: bool = False,
              whole: bool = False) -> np.ndarray:
        """The lesion's crop logits for its clicks so far: the network's (:meth:`answer`),
        upsampled to the crop, plus the stable-region prior, with the boundary then refined at full
        resolution (:mod:`~msam_core.pipeline.boundary`), each as the options set them; with a
        coarse view, the same for the mean of these logits and the coarse view's, and the
        candidate the image supports better is kept (:mod:`~msam_core.pipeline.coarse_view`).

        Args:
            state: from :meth:`open_crop`; its ``low_res`` is set to this click's network logits.
            points_crop: ``(N, 3)`` every click so far, crop voxel indices ``(a, b, c)``.
            labels: ``(N,)`` 1 positive / 0 negative.
            mask_prompt: the network's mask prompt ``[1, 1, 32, 32, 32]`` (calibrated units).
            iterations: decoder passes, each fed the previous one's logits.
            feedback: without ``mask_prompt``, prompt with the logits of the previous click on
                this crop (``msam evaluate``'s default protocol); else decode from the clicks
                alone (the service: a job, and each interaction of a session).
            whole: every voxel's logit as computed (see :meth:`finish`); by default only the
                signs are kept beyond the voxels that can be lesion.

        Returns:
            ``float32 [S, S, S]`` crop logits, ``> 0`` = lesion.
        """
        answer = self.answer(state, points_crop, labels, mask_prompt, iterations, feedback)
        return self.finish(state, answer, points_crop, labels, whole)

    def answer(self, state: CropState, points_crop: np.ndarray, labels: np.ndarray,
               mask_prompt: torch.Tensor | None = None, iterations: int = 1, feedback: bool = False) -> ClickAnswer:
        """The network's answer to the clicks so far on the crop (arguments as :meth:`click`): its
        logits, the coarse view's, and the union of the positive clicks' stable regions (grown on a
        background thread while the decoder runs)."""
        weight = self.options.prior_weight_for(labels)
        coarse = state.coarse
        growing = _background().submit(self._prior_region, state, points_crop, labels) if weight else None
        try:
            if mask_prompt is None and feedback:
                mask_prompt = state.low_res
            low_res = self.predict(state.embedding, points_crop, labels, mask_prompt, iterations, state.decoded)
            state.low_res = low_res
            coarse_low = None
            if coarse is not None:
                coarse_low = self.predict(coarse.embedding, points_to_coarse(points_crop, coarse.fine, coarse.grid),
                                          labels, None, iterations, coarse.decoded)
        finally:
            # a failed or cancelled click leaves no thread working on the crop's state
            if growing is not None:
                concurrent.futures.wait([growing])
        return ClickAnswer(fine=low_res, coarse=coarse_low, region=growing.result() if growing is not None else None)

    def finish(self, state: CropState, answer: ClickAnswer, points_crop: np.ndarray, labels: np.ndarray,
               whole: bool = False) -> np.ndarray:
        """The crop logits of :meth:`click` from the network's ``answer``.

        Each candidate's voxels are means of the network's cells (weights ``>= 0``) plus the
        prior's ``+weight`` inside its region and ``-weight`` elsewhere, so a voxel can be lesion
        only near a cell ``> 0`` of either view or inside the region
        (:func:`~msam_core.pipeline.postprocess.upsample_reach`,
        :func:`~msam_core.pipeline.coarse_view.fine_reach`). Only the box around those voxels is
        upsampled and resampled (for a nodule a few percent of the crop); beyond it every voxel
        starts at :data:`~msam_core.pipeline.postprocess.BACKGROUND_LOGIT`. The boundary walk
        reads the logits' signs, writes its band from the image and the seeds alone and keeps the
        rest; the choice between candidates reads their masks. So the mask, and every logit
        ``> 0``, is what the whole crop's computation gives; only logits that are ``<= 0`` either
        way may differ. ``whole``: compute every voxel (the logits of windows that overlap are
        merged by value, so where a lesion spans windows their values count).
        """
        return self._finish(state, answer, points_crop, labels, whole)[0]

    def _finish(self, state: CropState, answer: ClickAnswer, points_crop: np.ndarray, labels: np.ndarray,
                whole: bool = False) -> tuple[np.ndarray, Box3 | None]:
        """:meth:`finish`, and a box of the crop that holds every logit ``> 0`` (``None``: the
        crop): the computed box grown by the walker's band (the band lies that close to the mask,
        and the mask inside the box) and the positive clicks, which the walker makes positive."""
        weight = self.options.prior_weight_for(labels)
        band = self.options.boundary_band_for(labels)
        coarse = state.coarse
        size = state.image.shape[-1]
        region = answer.region
        box = support = None
        if not whole:
            reach = [upsample_reach(answer.fine, size), bbox_slices(region) if region is not None else None]
            if answer.coarse is not None and coarse is not None:
                reach.append(fine_reach(answer.coarse, coarse.fine, coarse.grid))
            shape = state.image.shape[-3:]
            box = union_box(reach, shape)
            support = walk_reach(box, points_crop, labels, band, shape)
        logits = upsample_logits(answer.fine, size=size, box=box)
        both = None
        if answer.coarse is not None and coarse is not None:
            seen = low_res_to_fine(answer.coarse, coarse.fine, coarse.grid, box)
            if box is None:
                both = (logits + seen) / 2
            else:  # beyond the box both are the same background, their mean too
                both = logits.copy()
                both[box] = (logits[box] + seen[box]) / 2
        crop = state.image.detach().cpu().numpy() if band or both is not None else None

        def finish(raw: np.ndarray) -> np.ndarray:
            """``raw`` (an array of this click's, written into) with the prior and the boundary walk."""
            out = add_prior(raw, region, weight, box, overwrite=True) if weight else raw
            if not band:
                return out
            with self._stage("boundary"):
                return refine_boundary(crop, out, points_crop, labels, band, overwrite=True, within=support)

        if both is None:
            return finish(logits), support
        candidates = {"fine": finish(logits), "both": finish(both)}
        return candidates[choose(crop, candidates, within=support)], support

    # -- whole requests -----------------------------------------------------------------------
    def segment(self, volume: Volume, points: Sequence[Point] = (), boxes: Sequence[Box] = (),
                prior: np.ndarray | None = None, iterations: int = 1) -> SegmentationResult:
        """Segment every prompted lesion of ``volume``; labels on ``volume``'s grid.

        Raises:
            InvalidPrompt: see :func:`~msam_core.pipeline.prompts.resolve_prompts`; iterations
                outside 1..20.
        """
        return self.segment_lesions(volume, resolve_prompts(volume, points, boxes, prior), iterations)

    def segment_lesions(self, volume: Volume, lesions: Sequence[LesionPrompt],
                        iterations: int = 1, sampler: VolumeSampler | None = None) -> SegmentationResult:
        """Like :meth:`segment`, for prompts already resolved against ``volume``.

        ``sampler`` (from :meth:`sampler` on the same volume) may be kept between requests on
        one image to skip wrapping it again.
        """
        if not 1 <= int(iterations) <= MAX_ITERATIONS:
            raise InvalidPrompt(f"iterations must be between 1 and {MAX_ITERATIONS}, got {iterations}")
        if sampler is None or sampler.volume is not volume:
            sampler = self.sampler(volume)
        per_lesion = {}
        outcomes = []
        for n, lesion in enumerate(lesions, start=1):
            canvas, outcome = self.segment_lesion(sampler, lesion, int(iterations))
            logits, affine = canvas.merged()
            grid_logits = logits_to_volume_grid(logits, affine, volume)
            if lesion.box is not None:
                grid_logits = clip_to_box(grid_logits, lesion.box, volume)
            per_lesion[lesion.lesion] = grid_logits
            outcomes.append(outcome)
            self.hooks.lesion_done(n, len(lesions))
        labels = combine_lesions(per_lesion, volume.shape)
        counts = np.bincount(labels.ravel(), minlength=256)
        for outcome in outcomes:
            outcome.voxels = int(counts[outcome.lesion])
        return SegmentationResult(labels=labels, lesions=outcomes, model_id=self.model.model_id,
                                  intensity=sampler.intensity)

    def segment_lesion(self, sampler: VolumeSampler, lesion: LesionPrompt, iterations: int = 1,
                       crops: MutableMapping[CropGrid, CropState] | None = None,
                       source: str | None = None) -> tuple[LogitCanvas, LesionOutcome]:
        """Predict one lesion, following it over further windows while it reaches their border.

        ``crops``: the crop states of earlier requests on the same volume (an interactive
        session), by grid; a window whose grid is there reuses its crop, embedding, coarse view
        and grown regions, and new windows are added. ``source``: the volume's immutable name,
        for :func:`grid_key`.

        Returns the merged logits (on the lesion's RAS-aligned 1.5 mm lattice) and a summary.
        """
        base = CropGrid.centred(lesion.center_ras, size=self.model.img_size)
        canvas = LogitCanvas(base=base)
        queue: list[Offset] = [(0, 0, 0)]
        seen: set[Offset] = {(0, 0, 0)}
        outcome = LesionOutcome(lesion=lesion.lesion, windows=0, cache_hits=0)
        while queue:
            if outcome.windows >= self.max_windows:
                outcome.stopped_at_limit = True
                break
            offset = queue.pop(0)
            grid = window_grid(base, offset)
            pts, labels = self._window_points(grid, lesion, canvas, offset)
            if pts is None:
                continue  # nothing of this lesion is known to reach into that window
            state = crops.get(grid) if crops is not None else None
            if state is None:
                state = self.open_crop(sampler.crop(grid), grid, sampler=sampler, source=source)
                outcome.cache_hits += int(state.cache_hit)
                if crops is not None:
                    crops[grid] = state
            else:
                outcome.cache_hits += 1
            mask_prompt = None
            if lesion.prior is not None:
                mask_prompt = mask_to_logits(mask_on_grid(lesion.prior, sampler.volume, grid))
            answer = self.answer(state, pts, labels, mask_prompt, iterations)
            whole = outcome.windows > 0
            logits, support = self._window_logits(state, answer, pts, labels, lesion, sampler, whole)
            faces = touched_faces(positive_mask(logits, support), lambda p, g=grid: sampler.inside_image(g, p))
            if faces and not whole:
                # more windows follow, and overlapping windows are merged by value
                whole = True
                logits, support = self._window_logits(state, answer, pts, labels, lesion, sampler, whole)
            canvas.add(offset, logits, alone=not whole, within=support)
            outcome.windows += 1
            for axis, side in faces:
                nxt = neighbour(offset, axis, side)
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        return canvas, outcome

    # -- helpers ------------------------------------------------------------------------------
    def _window_logits(self, state: CropState, answer: ClickAnswer, points_crop: np.ndarray, labels: np.ndarray,
                       lesion: LesionPrompt, sampler: VolumeSampler, whole: bool) -> tuple[np.ndarray, Box3 | None]:
        """One window's crop logits and the box that holds its logits ``> 0`` (:meth:`_finish`),
        background outside the lesion's box prompt."""
        logits, support = self._finish(state, answer, points_crop, labels, whole)
        if lesion.box is not None:
            grid = state.grid
            centres = grid.crop_to_ras(np.indices(grid.shape).reshape(3, -1).T)
            inside = lesion.box.contains_ras(centres, sampler.volume).reshape(grid.shape)
            logits[~inside] = BACKGROUND_LOGIT
        return logits, support

    def _window_points(self, grid: CropGrid, lesion: LesionPrompt, canvas: LogitCanvas,
                       offset: Offset) -> tuple[np.ndarray | None, np.ndarray]:
        """Clicks for one window, in crop voxel indices: the user's clicks that fall inside it,
        the box centre as a positive click, and (further windows) a positive seed deep inside
        the part of the lesion already segmented. ``None`` when the window has no positive."""
        pts = [p for p in lesion.points_ras]
        labels = [int(v) for v in lesion.labels]
        if lesion.box is not None:
            pts.append(lesion.box.center_ras)
            labels.append(1)
        crop_pts = grid.ras_to_crop(np.asarray(pts).reshape(-1, 3))
        keep = grid.contains_crop(crop_pts)
        crop_pts, lab = crop_pts[keep], np.asarray(labels, np.int64)[keep]
        if offset != (0, 0, 0):
            known_logits, known = canvas.window(offset)
            seed = seed_from_known(known_logits, known)
            if seed is not None:
                crop_pts = np.vstack([seed[None], crop_pts])
                lab = np.concatenate([[1], lab]).astype(np.int64)
        if not np.any(lab == 1):
            if offset == (0, 0, 0) and lesion.prior is not None:
                centre = grid.ras_to_crop(lesion.center_ras)  # deepest point of the prior
                return np.vstack([centre, crop_pts]), np.concatenate([[1], lab]).astype(np.int64)
            return None, lab
        return crop_pts, lab
