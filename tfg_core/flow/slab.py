"""Slab decoding: back-propagate through the decoder only where the slice classifier's loss has a gradient.

The guided step needs ``d loss / d z0_hat`` where the loss looks at the 2.5D stacks (centre +- 4 slices) of the
slices predicted positive, a small part of the volume. A full decode with autograd keeps every activation of the
decoder for the whole volume (MAISI-v2 at 128x128x64 about 9 GB, at 256x256x128 about 74 GB). Here:

1. ``decode_with_statistics`` decodes the whole latent once *without* a graph (the image the classifier sees and
   the trajectory shows) and records every GroupNorm's per-group mean and variance.
2. ``DecodedLatent.vjp`` takes the image gradient, finds the axial runs of slices where it is non-zero, and decodes
   each run again *with* a graph, from the smallest latent z-range that determines it: the run plus the
   decoder's receptive-field halo, block by block (``decoder_plan``). After every decoder block the activation is
   cropped to what the later blocks still need, so the full-resolution blocks, the expensive ones, only ever see
   the run plus a few voxels. Every GroupNorm uses the recorded whole-volume statistics, which makes the decoder a
   local operator: inside the run the decoded voxels equal the full decode (to float rounding).
3. Each decoder block is activation-checkpointed (``torch.utils.checkpoint``), so only block inputs are kept.

What changes: the gradient does not flow through the GroupNorm *statistics* (they are treated as constants, like
BatchNorm in eval mode); their share of the full gradient is measured in ``tests/test_slab.py`` and the guided
segmentations are compared with and without this path there. ``GuidanceConfig(decoder="full")`` keeps plain
autograd through a whole-volume decode.

Flows opt in by implementing ``FlowModel.decoder_stages`` (MAISI-v2 and the demo flow do). Blocks with non-local
operations (attention) are refused by ``decoder_plan``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution, MaisiUpsample
from monai.networks.blocks import SABlock, SpatialAttentionBlock
from monai.networks.blocks.upsample import UpSample
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DecoderStages:
    """What a flow exposes so its decoder can be run slab by slab.

    Args:
        prepare: latent in this project's layout ``(B, C, z, y, x)`` -> input of the first block (layout change,
            scale factor). Must act voxel by voxel (no spatial mixing).
        blocks: the decoder's blocks in order (conv, residual, upsampling, norm blocks; no attention).
        finish: output of the last block -> image ``(B, 1, z, y, x)`` in this project's layout.
        axis: the dimension of the blocks' tensors that is this project's z (2 for ``(B, C, z, y, x)``, 4 for
            MAISI's ``(B, C, x, y, z)``).
        autocast: context manager the decoder runs under (mixed precision); ``contextlib.nullcontext`` for none.
    """

    prepare: Callable[[torch.Tensor], torch.Tensor]
    blocks: Sequence[nn.Module]
    finish: Callable[[torch.Tensor], torch.Tensor]
    axis: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class BlockReach:
    """How far along the slab axis one block's output voxel looks into its input.

    Output voxel ``j`` depends on output-resolution neighbours within ``radius_out`` of ``j`` (convolutions after
    an upsampling) and those on input voxels within ``radius_in`` of ``j / factor``.

    Args:
        factor: upsampling factor of the block (1 or 2).
        radius_in: reach in input voxels (convolutions before upsampling, interpolation, transposed conv).
        radius_out: reach in output voxels (convolutions after upsampling).
    """

    factor: int
    radius_in: int
    radius_out: int

    def input_range(self, lo: int, hi: int, size_in: int) -> tuple[int, int]:
        """Input voxels ``[lo', hi')`` (clipped to ``[0, size_in)``) that determine output voxels ``[lo, hi)``.

        Args:
            lo: first output voxel.
            hi: one past the last output voxel.
            size_in: input length along the axis.
        """
        first = math.floor((lo - self.radius_out) / self.factor) - self.radius_in
        last = math.ceil((hi + self.radius_out) / self.factor) + self.radius_in
        return max(first, 0), min(last, size_in)


def _conv_radius(conv: nn.Module, axis: int) -> int:
    k = conv.kernel_size[axis - 2]
    d = conv.dilation[axis - 2]
    return d * (k - 1) // 2


def block_reach(block: nn.Module, axis: int) -> BlockReach:
    """The reach of one decoder block along ``axis``, read from its modules (conservative where a block has
    parallel paths: their radii are added).

    Args:
        block: a decoder block.
        axis: the tensor dimension of the slab axis.

    Raises:
        ValueError: for non-local blocks (attention) or upsampling this function does not know.
    """
    if any(isinstance(m, (SABlock, SpatialAttentionBlock, nn.MultiheadAttention)) for m in block.modules()):
        raise ValueError(f"{type(block).__name__} mixes the whole volume (attention): it cannot be decoded by slabs")
    convs = [m for m in block.modules() if isinstance(m, nn.Conv3d)]
    transposed = [m for m in block.modules() if isinstance(m, nn.ConvTranspose3d)]
    conv_reach = sum(_conv_radius(c, axis) for c in convs)
    if transposed:
        (tconv,) = transposed
        stride = tconv.stride[axis - 2]
        k = tconv.kernel_size[axis - 2]
        return BlockReach(stride, math.ceil(k / stride) + 1, conv_reach)
    interpolating = isinstance(block, MaisiUpsample) or (
        isinstance(block, UpSample) and not any(isinstance(m, nn.ConvTranspose3d) for m in block.modules())
    )
    if interpolating:
        # nearest/trilinear x2 reads the input voxel and its neighbour; the conv after it acts at output resolution
        return BlockReach(2, 1, conv_reach)
    if any(isinstance(m, nn.Upsample) for m in block.modules()):
        raise ValueError(f"{type(block).__name__}: unsupported upsampling for slab decoding")
    return BlockReach(1, conv_reach, 0)


@dataclass(frozen=True)
class DecoderPlan:
    """Per-block reach and the cumulative halo of a decoder along the slab axis.

    Args:
        reaches: one ``BlockReach`` per block.
        factor: total upsampling factor (latent voxel -> image voxels).
    """

    reaches: tuple[BlockReach, ...]
    factor: int

    def ranges(self, lo: int, hi: int, latent_size: int) -> list[tuple[int, int]]:
        """The voxel range each block's input must cover to produce image slices ``[lo, hi)`` exactly; the last
        entry is ``(lo, hi)`` itself (the output of the last block).

        Args:
            lo: first image slice.
            hi: one past the last image slice.
            latent_size: latent length along the axis.
        """
        sizes = [latent_size]
        for reach in self.reaches:
            sizes.append(sizes[-1] * reach.factor)
        if not 0 <= lo < hi <= sizes[-1]:
            raise ValueError(f"image slices [{lo}, {hi}) outside [0, {sizes[-1]})")
        ranges = [(lo, hi)]
        for reach, size_in in zip(reversed(self.reaches), reversed(sizes[:-1])):
            ranges.append(reach.input_range(*ranges[-1], size_in))
        return ranges[::-1]

    def halo(self) -> int:
        """Latent voxels on each side of a slab that influence it (the receptive field along the axis)."""
        middle = 1024  # far from both ends, so nothing is clipped
        return middle - self.ranges(self.factor * middle, self.factor * middle + 1, 2 * middle)[0][0]


def decoder_plan(stages: DecoderStages) -> DecoderPlan:
    """Read every block's reach along the slab axis.

    Args:
        stages: the flow's decoder stages.
    """
    reaches = tuple(block_reach(b, stages.axis) for b in stages.blocks)
    return DecoderPlan(reaches, math.prod(r.factor for r in reaches))


# --- GroupNorm with recorded statistics ---------------------------------------------------------------------------


class _StopBlock(Exception):
    """Raised by a GroupNorm that has just accumulated its input's statistics: the rest of the block must wait."""


@dataclass
class _NormStatistics:
    """Per-(sample, group) mean and 1/std of every GroupNorm input of one whole-volume decode.

    ``core`` is set while a block runs chunk by chunk: ``(axis, offset, length, extent)`` of the chunk's own voxels
    inside its input (the rest is halo, counted by the neighbouring chunks).
    """

    by_module: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    partial: dict[int, tuple[nn.GroupNorm, float, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    core: tuple[int, int, int, int] | None = None

    def accumulate(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        """Merge the core voxels of ``x`` into ``norm``'s running count, mean and sum of squares (Chan et al.)."""
        axis, offset, length, extent = self.core
        if x.shape[axis] != extent:
            raise RuntimeError(f"a GroupNorm inside a block saw {x.shape[axis]} voxels along the slab axis, expected "
                               f"{extent}: chunked recording needs blocks that keep their size")
        core = x.narrow(axis, offset, length).float().reshape(x.shape[0], norm.num_groups, -1)
        var, mean = torch.var_mean(core, dim=-1, unbiased=False)
        n_c, mean, m2 = float(core.shape[-1]), mean.double(), var.double() * core.shape[-1]
        if id(norm) in self.partial:
            _, n, mean_all, m2_all = self.partial[id(norm)]
            delta = mean - mean_all
            total = n + n_c
            mean, m2, n_c = mean_all + delta * n_c / total, m2_all + m2 + delta**2 * n * n_c / total, total
        self.partial[id(norm)] = (norm, n_c, mean, m2)

    def finalise(self) -> None:
        """Turn the running sums into the statistics the frozen GroupNorms use."""
        for key, (norm, n, mean, m2) in self.partial.items():
            self.by_module[key] = (mean.float(), torch.rsqrt((m2 / n).float() + norm.eps))
        self.partial.clear()


def _norm_output_dtype(norm: nn.GroupNorm) -> torch.dtype:
    # MAISI's GroupNorm computes in float32 and returns float16 when built with norm_float16 (its GPU setting)
    return torch.float16 if getattr(norm, "norm_float16", False) else torch.float32


def _normalising_forward(norm: nn.GroupNorm, stats: _NormStatistics) -> Callable[[torch.Tensor], torch.Tensor]:
    """GroupNorm that applies recorded statistics when it has them, else accumulates them (chunked recording) or
    records them from a whole-volume input."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if id(norm) in stats.by_module:
            mean, rstd = stats.by_module[id(norm)]
            b, c = x.shape[:2]
            per_group = c // norm.num_groups
            scale = rstd.repeat_interleave(per_group, dim=1)  # (B, C)
            shift = -mean.repeat_interleave(per_group, dim=1) * scale
            if norm.affine:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            view = (b, c) + (1,) * (x.ndim - 2)
            # an affine map per channel: its backward needs only `scale`, no activation is kept
            return torch.addcmul(shift.view(view), x.float(), scale.view(view)).to(_norm_output_dtype(norm))
        if stats.core is not None:
            stats.accumulate(norm, x)
            raise _StopBlock
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("slab decoding met a GroupNorm that the whole-volume decode did not record")
        x32 = x.float()
        var, mean = torch.var_mean(x32.reshape(x.shape[0], norm.num_groups, -1), dim=-1, unbiased=False)
        stats.by_module[id(norm)] = (mean, torch.rsqrt(var + norm.eps))
        return F.group_norm(x32, norm.num_groups, norm.weight, norm.bias, norm.eps).to(_norm_output_dtype(norm))

    return forward


@contextlib.contextmanager
def _group_norms(blocks: Sequence[nn.Module], stats: _NormStatistics, unsplit: bool = False) -> Iterator[None]:
    """Temporarily route every GroupNorm in ``blocks`` through ``stats`` (see ``_normalising_forward``).

    ``unsplit`` also runs MAISI's convolutions in one piece: MAISI splits each one in four along y to bound GPU
    memory on whole volumes, which on a slab only costs (every split's backward allocates a gradient buffer of the
    whole input) and a concatenated copy of every output.
    """
    modules = [m for b in blocks for m in b.modules()]
    norms = [m for m in modules if isinstance(m, nn.GroupNorm)]
    splits = {m: m.num_splits for m in modules if isinstance(m, MaisiConvolution)} if unsplit else {}
    try:
        for norm in norms:
            norm.forward = _normalising_forward(norm, stats)  # instance attribute shadows the class's forward
        for conv in splits:
            conv.num_splits = 1  # the same convolution, computed without splitting (exact)
        yield
    finally:
        stats.core = None
        for norm in norms:
            norm.__dict__.pop("forward", None)
        for conv, n in splits.items():
            conv.num_splits = n


def _chunked_block(block: nn.Module, reach: BlockReach, h: torch.Tensor, axis: int, chunk: int,
                   stats: _NormStatistics) -> torch.Tensor:
    """``block(h)`` without a graph, computed ``chunk`` output voxels at a time along ``axis`` into one tensor, so
    the block's intermediate activations never exist for the whole volume.

    A GroupNorm inside the block needs the statistics of its whole input before any chunk can pass it: each pass
    over the chunks runs up to the first GroupNorm without statistics, accumulates them from the chunks' own voxels
    and stops there (``_StopBlock``); the pass after the last one writes the output.
    """
    size_in = h.shape[axis]
    size_out = size_in * reach.factor
    if reach.factor != 1 and any(isinstance(m, nn.GroupNorm) for m in block.modules()):
        return block(h)  # a GroupNorm behind an upsampling would see other extents: whole tensor (none in MAISI)
    spans = [(a, min(a + chunk, size_out)) for a in range(0, size_out, chunk)]
    while True:
        out, stopped = None, False
        for a, b in spans:
            lo, hi = reach.input_range(a, b, size_in)
            stats.core = (axis, a - lo, b - a, hi - lo)
            try:
                y = block(h.narrow(axis, lo, hi - lo))
            except _StopBlock:
                stopped = True
                continue
            finally:
                stats.core = None
            if out is None:
                shape = list(y.shape)
                shape[axis] = size_out
                out = y.new_empty(shape)
            out.narrow(axis, a, b - a).copy_(y.narrow(axis, a - lo * reach.factor, b - a))
        if not stopped:
            return out
        stats.finalise()


# --- decoding -----------------------------------------------------------------------------------------------------


@dataclass
class DecodedLatent:
    """A whole-volume decode without a graph, with what ``vjp`` needs to back-propagate slab by slab.

    Args:
        image: the decoded image ``(B, 1, z, y, x)`` (no graph).
        latent: the latent it was decoded from (detached).
        stages: the flow's decoder stages.
        plan: the decoder's reach per block.
        statistics: the recorded GroupNorm statistics.
        checkpointing: activation-checkpoint every block in ``vjp``.
        slab_slices: longest run of image slices back-propagated at once; longer runs are split (each part
            decodes its own halo again: more compute, a peak memory that does not grow with the nodule).
    """

    image: torch.Tensor
    latent: torch.Tensor
    stages: DecoderStages
    plan: DecoderPlan
    statistics: _NormStatistics
    checkpointing: bool = True
    slab_slices: int | None = None

    def _frozen(self) -> contextlib.ExitStack:
        """Autocast and the recorded statistics; must stay active through the backward pass, because checkpointed
        blocks are recomputed there."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.stages.autocast())
        stack.enter_context(_group_norms(self.stages.blocks, self.statistics, unsplit=True))
        return stack

    def decode_slab(self, latent: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Image slices ``[lo, hi)`` of ``decode(latent)``, computed from the latent range that determines them, with
        the recorded statistics. Returns ``(B, 1, hi - lo, y, x)`` (no graph: ``vjp`` back-propagates).

        Args:
            latent: a latent of the recorded one's shape (the recorded statistics belong to the recorded latent).
            lo: first image slice.
            hi: one past the last image slice.
        """
        with torch.no_grad(), self._frozen():
            return self._slab_forward(latent, lo, hi)

    def _slab_forward(self, latent: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        axis = self.stages.axis
        ranges = self.plan.ranges(lo, hi, latent.shape[2])
        first, last = ranges[0]
        # `prepare` acts voxel by voxel, so narrowing in the project's layout (dim 2) before it is exact
        h = self.stages.prepare(latent.narrow(2, first, last - first))
        origin = first
        for block, reach, (next_lo, next_hi) in zip(self.stages.blocks, self.plan.reaches, ranges[1:]):
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False, preserve_rng_state=False)
            else:
                h = block(h)
            origin *= reach.factor
            # keep only what later blocks read: full-resolution blocks then see the slab plus a few voxels
            # (a copy, so the uncropped output is freed rather than kept alive by a view)
            h = h.narrow(axis, next_lo - origin, next_hi - next_lo).contiguous()
            origin = next_lo
        return self.stages.finish(h)

    def vjp(self, grad_image: torch.Tensor) -> torch.Tensor:
        """``d (grad_image . decode(latent)) / d latent``: back-propagate an image gradient through slab decodes of
        the axial runs where it is non-zero (the recorded GroupNorm statistics held constant).

        Args:
            grad_image: gradient w.r.t. ``image``, same shape.
        """
        if grad_image.shape != self.image.shape:
            raise ValueError(f"grad_image has shape {tuple(grad_image.shape)}, the image {tuple(self.image.shape)}")
        grad = torch.zeros_like(self.latent)
        for lo, hi in self.slabs(grad_image):
            leaf = self.latent.detach().requires_grad_(True)
            with torch.enable_grad(), self._frozen():
                slab = self._slab_forward(leaf, lo, hi)
                (g,) = torch.autograd.grad(slab, leaf, grad_outputs=grad_image[:, :, lo:hi].to(slab.dtype))
            grad += g
        return grad

    def runs(self, grad_image: torch.Tensor) -> list[tuple[int, int]]:
        """Axial runs ``[lo, hi)`` of slices where ``grad_image`` is non-zero; runs whose latent ranges overlap are
        merged (decoding the shared halo once is cheaper than twice).

        Args:
            grad_image: image gradient ``(B, 1, z, y, x)``.
        """
        nonzero = grad_image.ne(0).flatten(3).any(-1).any(1).any(0).nonzero().flatten().tolist()
        runs: list[list[int]] = []
        for s in nonzero:
            if runs and s == runs[-1][1]:
                runs[-1][1] = s + 1
            else:
                runs.append([s, s + 1])
        latent_size = self.latent.shape[2]
        merged: list[list[int]] = []
        for lo, hi in runs:
            if merged:
                prev_hi_latent = self.plan.ranges(*merged[-1], latent_size)[0][1]
                if self.plan.ranges(lo, hi, latent_size)[0][0] < prev_hi_latent:
                    merged[-1][1] = hi
                    continue
            merged.append([lo, hi])
        return [(lo, hi) for lo, hi in merged]

    def slabs(self, grad_image: torch.Tensor) -> list[tuple[int, int]]:
        """``runs`` split into parts of at most ``slab_slices`` slices: what ``vjp`` decodes, one at a time.

        Args:
            grad_image: image gradient ``(B, 1, z, y, x)``.
        """
        step = self.slab_slices
        return [(a, min(a + step, hi)) if step else (lo, hi)
                for lo, hi in self.runs(grad_image) for a in (range(lo, hi, step) if step else [lo])]


def decode_with_statistics(stages: DecoderStages, latent: torch.Tensor, checkpointing: bool = True,
                           slab_slices: int | None = None) -> DecodedLatent:
    """Decode ``latent`` without a graph, recording every GroupNorm's statistics for ``DecodedLatent.vjp``.

    Args:
        stages: the flow's decoder stages (``FlowModel.decoder_stages()``).
        latent: latent ``(B, C, z', y', x')`` in this project's layout.
        checkpointing: activation-checkpoint every block when back-propagating slabs.
        slab_slices: None decodes every block on the whole volume (fastest) and back-propagates whole runs; a number
            bounds memory instead: every block is run that many output voxels at a time along the axis (each chunk
            with its halo; blocks with GroupNorms inside take a pass per norm), and runs are back-propagated in
            parts of that many image slices.
    """
    if slab_slices is not None and slab_slices < 1:
        raise ValueError(f"slab_slices must be >= 1 or None, got {slab_slices}")
    plan = decoder_plan(stages)
    statistics = _NormStatistics()
    latent = latent.detach()
    with torch.no_grad(), stages.autocast(), _group_norms(stages.blocks, statistics, unsplit=slab_slices is not None):
        h = stages.prepare(latent)
        for block, reach in zip(stages.blocks, plan.reaches):
            if slab_slices is None:
                h = block(h)
            else:
                h = _chunked_block(block, reach, h, stages.axis, slab_slices, statistics)
        image = stages.finish(h)
    return DecodedLatent(image, latent, stages, plan, statistics, checkpointing, slab_slices)
