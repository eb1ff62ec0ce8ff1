"""Exact tiled encode and decode: the VAE run tile by tile, with the result of the untiled network.

Cutting an image into tiles and running the network on each one changes the result in two ways; both are
undone here, so tiling changes only the memory, not the output (up to float rounding):
- GroupNorm normalises with statistics over the whole image. Per-tile statistics would differ from tile to
  tile, so they are gathered over all tiles first (per-channel sums and sums of squares over each tile's
  core, in float64; the cores partition the image) and every tile is then normalised with the merged ones.
- A 3x3 convolution near a tile border reads its neighbour's pixels. Each tile is computed on its core plus a
  halo exactly as wide as the convolutions since the last whole-image activation need, and zero padding is
  applied only where a tile touches the image border, as the untiled network pads.
The mid-block attention sees every pixel, so it runs on the whole lowest-resolution activation (small).

The network therefore runs GroupNorm by GroupNorm in lockstep over the tiles. One sweep over all tiles computes
an activation up to a GroupNorm and accumulates its statistics; the next sweep can normalise with them. A
sweep starts from activations kept whole between sweeps ("stashes", in host memory) and recomputes on each
tile whatever was not kept. Keeping every swept activation costs about the untiled pass's time; `stash_budget`
caps the bytes kept, and an activation that does not fit is recomputed from the last one kept, by every
sweep that needs it: less memory, more time. Kept in float16 (`stash_dtype`), activations take half the
bytes, rounded to 11 significant bits: close to the untiled result, no longer equal to it. The compute
device only ever holds one tile's activations and the attention's input.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaegan.autoencoder.network import (
    Attention,
    AutoencoderKL,
    Downsample2D,
    MidBlock2D,
    ResnetBlock2D,
    Upsample2D,
    is_channels_last,
)


class Box(NamedTuple):
    """Rows [top, bottom) and columns [left, right) of an activation that is height x width pixels."""

    top: int
    bottom: int
    left: int
    right: int
    height: int
    width: int

    @classmethod
    def whole(cls, height: int, width: int) -> Box:
        return cls(0, height, 0, width, height, width)

    def grow(self, margin: int) -> Box:
        """The box widened by `margin` on every side, clipped to the activation."""
        return Box(max(self.top - margin, 0), min(self.bottom + margin, self.height),
                   max(self.left - margin, 0), min(self.right + margin, self.width), self.height, self.width)

    def shrink_inside(self, margin: int) -> Box:
        """The box narrowed by `margin` on the sides that are not on the activation's border."""
        return Box(self.top + margin * (self.top > 0), self.bottom - margin * (self.bottom < self.height),
                   self.left + margin * (self.left > 0), self.right - margin * (self.right < self.width),
                   self.height, self.width)

    def border_padding(self, margin: int) -> tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom): `margin` zeros on the sides on the activation's border only."""
        return (margin * (self.left == 0), margin * (self.right == self.width),
                margin * (self.top == 0), margin * (self.bottom == self.height))

    def scaled(self, factor: int) -> Box:
        return Box(*(factor * value for value in self))

    def union(self, other: Box) -> Box:
        return Box(min(self.top, other.top), max(self.bottom, other.bottom), min(self.left, other.left),
                   max(self.right, other.right), self.height, self.width)

    def of(self, tensor: torch.Tensor, outer: Box) -> torch.Tensor:
        """This box's part of `tensor` (B, C, rows, cols), which holds the box `outer`: a view."""
        return tensor[:, :, self.top - outer.top:self.bottom - outer.top,
                      self.left - outer.left:self.right - outer.left]


# ---- the network as a graph of steps that can run on a box ----

class Step:
    """One operation of the network: which boxes of its inputs a box of its output needs, and how to compute.

    `__call__` gets each input cut to the box that `needs` asked for and returns the output with its box,
    which contains the box it was asked for.
    """

    norm: nn.GroupNorm | None = None  # a GroupNorm applied to the first input: statistics needed first
    macs = 0                          # multiply-adds per output pixel: what recomputing it costs

    def needs(self, box: Box) -> list[Box]:
        raise NotImplementedError

    def __call__(self, inputs: list[torch.Tensor], boxes: list[Box], affine) -> tuple[torch.Tensor, Box]:
        raise NotImplementedError


class Conv(Step):
    """conv(silu(norm(x))), or conv(x) without a norm; stride 1 and 'same' zero padding (3x3 or 1x1)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.GroupNorm | None = None):
        self.conv, self.norm, self.margin = conv, norm, conv.padding[0]
        self.macs = conv.weight.numel()

    def needs(self, box):
        return [box.grow(self.margin)]

    def __call__(self, inputs, boxes, affine):
        (x,), (box,) = inputs, boxes
        if self.norm is not None:
            scale, shift = affine
            # Rounded to the activation's dtype before SiLU, as GroupNorm's own output is.
            x = F.silu(torch.addcmul(shift, x, scale).to(x.dtype), inplace=True)
        padding = box.border_padding(self.margin)
        if padding == (self.margin,) * 4:
            y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=self.margin)
        else:
            y = F.conv2d(F.pad(x, padding), self.conv.weight, self.conv.bias)
        return y, box.shrink_inside(self.margin)


class Residual(Step):
    """shortcut(x) + h: the end of a resnet block (the shortcut is a 1x1 conv when the width changes)."""

    def __init__(self, shortcut: nn.Conv2d | None):
        self.shortcut = shortcut
        self.macs = 0 if shortcut is None else shortcut.weight.numel()

    def needs(self, box):
        return [box, box]

    def __call__(self, inputs, boxes, affine):
        x, h = inputs
        return (x if self.shortcut is None else self.shortcut(x)) + h, boxes[1]


class Upsample(Step):
    """Nearest-neighbour doubling and a 3x3 conv (`Upsample2D`), on a box."""

    def __init__(self, upsample: Upsample2D):
        self.upsample = upsample
        self.kernel = upsample.transposed_kernel().detach()  # weights are frozen while a graph runs
        self.macs = 4 * upsample.conv.weight[:, :, 0, 0].numel()  # 2x2 of the 4x4 taps reach each output pixel

    def needs(self, box):
        # Output row r reads doubled rows r-1..r+1, which are input rows (r-1)//2 .. (r+1)//2.
        height, width = box.height // 2, box.width // 2
        return [Box(max((box.top - 1) // 2, 0), min(box.bottom // 2 + 1, height),
                    max((box.left - 1) // 2, 0), min(box.right // 2 + 1, width), height, width)]

    def __call__(self, inputs, boxes, affine):
        # Upsample2D reads zeros beyond its input on every side: right at the image border, wrong for the
        # outermost output row or column on a side inside the image, which is dropped.
        doubled = boxes[0].scaled(2)
        valid = doubled.shrink_inside(1)
        return valid.of(self.upsample(inputs[0], self.kernel), doubled), valid


class Downsample(Step):
    """Zero padding on the right and bottom by one, then a stride-2 3x3 conv (`Downsample2D`), on a box."""

    def __init__(self, downsample: Downsample2D):
        self.conv = downsample.conv
        self.macs = self.conv.weight.numel()

    def needs(self, box):
        # Output row r reads input rows 2r..2r+2, where row 2r+2 is the zero padding at the bottom border.
        height, width = 2 * box.height, 2 * box.width
        return [Box(2 * box.top, min(2 * box.bottom + 1, height), 2 * box.left, min(2 * box.right + 1, width),
                    height, width)]

    def __call__(self, inputs, boxes, affine):
        (x,), (box,) = inputs, boxes  # box.top and box.left are even: output pixels start on the stride grid
        _, right, _, bottom = box.border_padding(1)
        y = F.conv2d(F.pad(x, (0, right, 0, bottom)), self.conv.weight, self.conv.bias, stride=2)
        top, left = box.top // 2, box.left // 2
        return y, Box(top, top + y.shape[-2], left, left + y.shape[-1], box.height // 2, box.width // 2)


class Whole(Step):
    """The mid-block attention: every output pixel reads every input pixel, so it only runs on the whole."""

    def __init__(self, attention: Attention):
        self.attention = attention

    def needs(self, box):
        return [Box.whole(box.height, box.width)]

    def __call__(self, inputs, boxes, affine):
        return self.attention(inputs[0]), boxes[0]


@dataclass
class Node:
    """A step with its inputs (node indices), the channels of its output and that output's pixels per latent
    pixel (8 for an f8 image, 1 for the latent)."""

    step: Step | None  # None for the graph's input
    inputs: tuple[int, ...]
    channels: int
    scale: int


class Graph:
    """The network as nodes in execution order; node 0 is the input (image or latent)."""

    def __init__(self, channels: int, scale: int):
        self.nodes = [Node(None, (), channels, scale)]

    def add(self, step: Step, *inputs: int) -> int:
        """Append a step reading the given nodes; returns the new node's index."""
        last = self.nodes[inputs[-1]]  # a residual's width is its last input's, h
        channels = step.conv.out_channels if isinstance(step, Conv) else last.channels
        scale = {Upsample: 2 * last.scale, Downsample: last.scale // 2}.get(type(step), last.scale)
        self.nodes.append(Node(step, inputs, channels, scale))
        return len(self.nodes) - 1

    def add_resnet(self, resnet: ResnetBlock2D, x: int) -> int:
        h = self.add(Conv(resnet.conv1, resnet.norm1), x)
        h = self.add(Conv(resnet.conv2, resnet.norm2), h)
        return self.add(Residual(resnet.conv_shortcut), x, h)

    def add_mid_block(self, mid: MidBlock2D, x: int) -> int:
        x = self.add_resnet(mid.resnets[0], x)
        for attention in mid.attentions:
            x = self.add(Whole(attention), x)
        return self.add_resnet(mid.resnets[1], x)


def encoder_graph(vae: AutoencoderKL) -> Graph:
    """Images (B, 3, H, W) -> moments (B, 2C, H/f, W/f), as `AutoencoderKL.moments`."""
    encoder, config = vae.encoder, vae.config
    graph = Graph(config.in_channels, config.downsampling_factor)
    x = graph.add(Conv(encoder.conv_in), 0)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            x = graph.add_resnet(resnet, x)
        for downsample in block.downsamplers:
            x = graph.add(Downsample(downsample), x)
    x = graph.add_mid_block(encoder.mid_block, x)
    x = graph.add(Conv(encoder.conv_out, encoder.conv_norm_out), x)
    if vae.quant_conv is not None:
        graph.add(Conv(vae.quant_conv), x)
    return graph


def decoder_graph(vae: AutoencoderKL) -> Graph:
    """Raw latents (B, C, h, w) -> images (B, 3, h*f, w*f), as `AutoencoderKL.decode`."""
    decoder, config = vae.decoder, vae.config
    graph = Graph(config.latent_channels, 1)
    x = 0
    if vae.post_quant_conv is not None:
        x = graph.add(Conv(vae.post_quant_conv), x)
    x = graph.add(Conv(decoder.conv_in), x)
    x = graph.add_mid_block(decoder.mid_block, x)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = graph.add_resnet(resnet, x)
        for upsample in block.upsamplers:
            x = graph.add(Upsample(upsample), x)
    graph.add(Conv(decoder.conv_out, decoder.conv_norm_out), x)
    return graph


# ---- GroupNorm statistics over all tiles ----

class Moments:
    """Per-channel pixel count, mean and summed squared deviation of one activation over the tile cores seen
    so far, in float64. Tiles merge with Chan et al.'s pairwise update, so a large mean never cancels a small
    variance."""

    def __init__(self):
        self.count, self.mean, self.deviation = 0, None, None

    def add(self, y: torch.Tensor):
        """Add one tile core, y (B, C, rows, cols)."""
        # Two passes (the mean, then squared deviations from it): as stable as torch.var_mean and, on
        # channels_last tiles, several times faster.
        y = y.float()
        mean = y.mean((2, 3), keepdim=True)
        variance = (y - mean).square_().mean((2, 3))                                # (B, C)
        mean, count = mean.flatten(1).cpu().double(), y.shape[2] * y.shape[3]
        deviation = variance.cpu().double() * count
        if self.mean is None:
            self.count, self.mean, self.deviation = count, mean, deviation
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.deviation = self.deviation + deviation + delta.square() * (self.count * count / total)
        self.count = total

    def affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm with these statistics as a per-channel affine map: (scale, shift), each (B, C, 1, 1),
        so that norm(x) = x * scale + shift (what GroupNorm computes, with the whole image's statistics)."""
        batch, channels = self.mean.shape
        mean = self.mean.view(batch, norm.num_groups, -1)                          # (B, G, C/G)
        group_mean = mean.mean(-1, keepdim=True)                                   # (B, G, 1)
        deviation = self.deviation.view_as(mean).sum(-1, keepdim=True)
        deviation = deviation + self.count * (mean - group_mean).square().sum(-1, keepdim=True)
        variance = deviation / (self.count * mean.shape[-1])                      # biased, as GroupNorm's
        scale = torch.rsqrt(variance + norm.eps).expand_as(mean).reshape(batch, channels)
        shift = -group_mean.expand_as(mean).reshape(batch, channels) * scale
        if norm.affine:
            weight, bias = norm.weight.detach().cpu().double(), norm.bias.detach().cpu().double()
            scale, shift = scale * weight, shift * weight + bias
        return scale.float()[:, :, None, None], shift.float()[:, :, None, None]


# ---- running a graph tile by tile ----

def spans(length: int, tile: int) -> list[tuple[int, int]]:
    """The fewest near-equal [start, stop) spans of at most `tile` that partition range(length)."""
    count = math.ceil(length / tile)
    bounds = [round(i * length / count) for i in range(count + 1)]
    return list(pairwise(bounds))


@dataclass(frozen=True)
class Sweep:
    """One step of a plan: node `index` computed on every tile (the attention: on the whole activation)."""

    index: int
    moments: bool             # gather its statistics: a GroupNorm reads it
    keep: bool                # stash it whole for the sweeps after
    reuse: int | None = None  # the stash it overwrites as it goes, one that dies once this one is kept


@dataclass(frozen=True)
class Plan:
    """The sweeps of an exact tiled pass, what they cost and the most they keep at once."""

    sweeps: tuple[Sweep, ...]
    macs: int              # multiply-adds per image of all sweeps (the attention's not counted)
    peak_stash_bytes: int


class ExactTiling:
    """One exact tiled forward pass of a graph over a batch: its plan, sweeps, stashes and statistics.

    Args:
        graph: the network (`encoder_graph` or `decoder_graph` of the VAE).
        x: the graph's input (B, C, H, W) on any device; H and W are multiples of the input's scale.
        tile: tile side in latent pixels; tiles are as equal as possible and at most this large.
        stash_budget: bytes of whole activations kept between sweeps (the input and the result excluded);
            None for no limit. The plan recomputes the fewest multiply-adds the budget allows (see `plan`).
            The attention's input and output are always kept: they are the smallest activations.
        stash_device: where kept activations live; the host by default (pinned when computing on CUDA), so
            the compute device only ever holds one tile's activations and the attention's input.
        stash_dtype: the precision kept activations are stored in; None for the network's. float16 under an
            fp32 network halves the stashes' bytes (a budget then keeps twice the activations) at the price of
            rounding each kept value to 11 significant bits: no longer equal to the untiled result up to fp32
            rounding, but close (docs/design/exact-tiling.md gives the measured PSNR). An activation beyond
            float16's range raises OverflowError instead of becoming inf.
    """

    def __init__(self, graph: Graph, x: torch.Tensor, tile: int, stash_budget: int | None = None,
                 stash_device: str | torch.device = "cpu", stash_dtype: torch.dtype | None = None):
        if tile < 1:
            raise ValueError(f"tile={tile} must be at least 1 latent pixel")
        weight = graph.nodes[1].step.conv.weight  # the first step is always a conv
        self.graph, self.device, self.dtype = graph, weight.device, weight.dtype
        self.stash_dtype = stash_dtype or self.dtype
        self.memory_format = torch.channels_last if is_channels_last(weight) else torch.contiguous_format
        self.stash_device = torch.device(stash_device)
        self.pin = self.stash_device.type == "cpu" and self.device.type == "cuda"
        self.batch, self.out_device = x.shape[0], x.device
        scale = graph.nodes[0].scale
        self.latent = (x.shape[-2] // scale, x.shape[-1] // scale)
        self.rows, self.cols = spans(self.latent[0], tile), spans(self.latent[1], tile)
        self.budget = stash_budget
        self.stashes: dict[int, torch.Tensor] = {0: x}   # node -> whole activation (B, C, H_n, W_n)
        self.moments: dict[int, Moments] = {}            # node -> its statistics, once swept
        self.affines: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # norm step -> (scale, shift)
        self.peak_stash_bytes = 0
        self.costs: dict[tuple[int, frozenset], int] = {}  # (node, stashes it reads) -> sweep_cost

    def run(self) -> torch.Tensor:
        """The graph's output (B, C_out, H_out, W_out), in the network's dtype, on the input's device."""
        *sweeps, last = self.plan.sweeps
        for sweep in sweeps:
            node = self.graph.nodes[sweep.index]
            if sweep.index in self.stashes:
                self.sweep(sweep)  # the statistics of the attention's output, read from its stash
            elif isinstance(node.step, Whole):
                whole = self.stashes[node.inputs[0]].to(self.device, self.dtype)
                storage = node.step.attention(whole)
                self.check_range(sweep.index, storage, self.stash_dtype)
                storage = storage.to(self.stash_device, self.stash_dtype)
            elif sweep.keep:
                storage = self.stashes[sweep.reuse] if sweep.reuse is not None else self.new_stash(sweep.index)
                self.sweep(sweep, storage)
                self.stashes.pop(sweep.reuse, None)  # overwritten: now it holds this node
            else:
                self.sweep(sweep)
            if sweep.keep:
                self.stashes[sweep.index] = storage
                self.peak_stash_bytes = max(self.peak_stash_bytes, self.held(self.stashes))
                for dead in set(self.stashes) - self.live(set(self.stashes)):
                    del self.stashes[dead]
        out = torch.empty(self.shape(last.index), dtype=self.dtype, device=self.out_device)
        self.sweep(last, out)
        return out

    # ---- the plan ----

    def targets(self) -> list[Sweep]:
        """What the plan must do, in order: gather the statistics of every GroupNorm's input, keep the
        attention's input and run the attention on it; and, optionally, keep the activation before each change
        of resolution (one tensor, where sweeps after it would otherwise read a resnet block's input and
        middle)."""
        targets = []
        for index, node in enumerate(self.graph.nodes):
            if isinstance(node.step, Whole):
                targets += [Sweep(node.inputs[0], moments=False, keep=True), Sweep(index, False, keep=True)]
            elif node.step is not None and node.step.norm is not None:
                targets.append(Sweep(node.inputs[0], moments=True, keep=False))
            elif isinstance(node.step, (Upsample, Downsample)):
                targets.append(Sweep(node.inputs[0], moments=False, keep=False))
        return targets

    @functools.cached_property
    def plan(self) -> Plan:
        """The sweeps, in order and ending with the output's, that recompute the fewest multiply-adds while
        the stashes stay within the budget; among those, the plan whose stashes peak lowest.

        Each target is either kept whole (if the budget allows; in place of a stash that dies with it, if
        one fits) or, if a GroupNorm reads it, swept for its statistics alone; an optional one is skipped.
        """
        targets, last, memo = self.targets(), len(self.graph.nodes) - 1, {}

        def best(start: int, stashed: frozenset) -> tuple[int, int, tuple[Sweep, ...]]:
            """(multiply-adds, peak stash bytes, sweeps) for targets[start:] from the stashed nodes."""
            if start == len(targets):
                return self.cost(last, stashed), self.held(stashed), (Sweep(last, False, False),)
            if (start, stashed) in memo:
                return memo[start, stashed]
            target = targets[start]
            if target.index in stashed:  # the attention's output: only its statistics are missing
                cost, peak, rest = best(start + 1, stashed)
                options = [(cost, peak, ((target,) if target.moments else ()) + rest)]
            else:
                options, cost = [], self.cost(target.index, stashed)
                reuse = self.reusable(target.index, stashed)
                during = self.held(stashed) + (0 if reuse is not None else self.nbytes(target.index))
                kept = self.after(stashed, target.index)
                # Two stashes at a time (a resnet block's input and middle) is all a good plan needs; more
                # would be middles of earlier blocks whose outputs were not kept, and they multiply the states.
                if target.keep or len(kept - {0}) <= 2 and (self.budget is None or during <= self.budget):
                    rest_cost, peak, rest = best(start + 1, kept)
                    kept = Sweep(target.index, target.moments, True, reuse)
                    options.append((cost + rest_cost, max(peak, during), (kept, *rest)))
                # Without a budget, keeping never costs more (it only spares recomputation) and lets the
                # stashes of a resnet block's input and middle go; only a budget makes the other option worth it.
                if not target.keep and (self.budget is not None or not options):
                    rest_cost, peak, rest = best(start + 1, stashed)
                    if target.moments:
                        options.append((cost + rest_cost, peak, (target, *rest)))
                    else:
                        options.append((rest_cost, peak, rest))
            memo[start, stashed] = min(options, key=lambda option: option[:2])
            return memo[start, stashed]

        macs, peak, sweeps = best(0, frozenset({0}))
        return Plan(sweeps, macs, peak)

    def untiled_macs(self) -> int:
        """Multiply-adds per image of the untiled network (the attention's not counted), to compare plans to."""
        return sum(node.step.macs * math.prod(self.shape(index)[2:])
                   for index, node in enumerate(self.graph.nodes) if node.step is not None)

    def cost(self, index: int, stashed) -> int:
        """Multiply-adds of sweeping node `index` over all tiles from the stashed nodes."""
        read = self.live(stashed, index)  # the stashes this sweep reads: all that the cost depends on
        if (index, read) not in self.costs:
            self.costs[index, read] = self.sweep_cost(index, read)
        return self.costs[index, read]

    def sweep_cost(self, index: int, stashed) -> int:
        # Every rule in `Step.needs` treats rows and columns apart, so a node's box on tile (row, col) is its
        # rows on tile (row, any) times its columns on tile (any, col): the tiles on the diagonal tell all.
        heights, widths = {}, {}
        for i in range(max(len(self.rows), len(self.cols))):
            row, col = min(i, len(self.rows) - 1), min(i, len(self.cols) - 1)
            for node, box in self.boxes(index, self.core(index, row, col), stashed).items():
                if i < len(self.rows):
                    heights[node] = heights.get(node, 0) + box.bottom - box.top
                if i < len(self.cols):
                    widths[node] = widths.get(node, 0) + box.right - box.left
        return sum(self.graph.nodes[node].step.macs * heights[node] * widths[node]
                   for node in heights if node not in stashed)

    def reusable(self, index: int, stashed) -> int | None:
        """A stash that dies once node `index` is kept and that `index` may overwrite as it is swept: of the
        same shape, and read no further above a tile's core than one row of tiles is high (see `sweep`)."""
        for other in sorted(stashed - self.after(stashed, index) - {0}):  # never the caller's input
            if self.shape(other) != self.shape(index):
                continue
            halo = max(self.core(other, row, 0).top - self.boxes(index, self.core(index, row, 0), stashed)[other].top
                       for row in range(len(self.rows)))
            if halo <= self.graph.nodes[other].scale * min(stop - start for start, stop in self.rows):
                return other
        return None

    def after(self, stashed: frozenset, index: int) -> frozenset:
        """The stashes once node `index` is kept: the ones that what is left to compute still reads."""
        return self.live(stashed | {index})

    def live(self, stashed, index: int | None = None) -> frozenset:
        """The stashed nodes that node `index` (the graph's output by default) depends on through nodes that
        are not stashed."""
        live, seen, todo = set(), set(), [len(self.graph.nodes) - 1 if index is None else index]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in stashed:
                live.add(node)
            else:
                todo += self.graph.nodes[node].inputs
        return frozenset(live)

    def held(self, stashed) -> int:
        """Bytes of the stashed nodes (the caller's input not counted)."""
        return sum(self.nbytes(index) for index in stashed if index != 0)

    def shape(self, index: int) -> tuple[int, int, int, int]:
        node = self.graph.nodes[index]
        return (self.batch, node.channels, node.scale * self.latent[0], node.scale * self.latent[1])

    def nbytes(self, index: int) -> int:
        return math.prod(self.shape(index)) * self.stash_dtype.itemsize

    def core(self, index: int, row: int, col: int) -> Box:
        """Tile (row, col)'s core in node `index`'s pixels; the cores of all tiles partition the activation."""
        (top, bottom), (left, right) = self.rows[row], self.cols[col]
        return Box(top, bottom, left, right, *self.latent).scaled(self.graph.nodes[index].scale)

    def boxes(self, index: int, core: Box, stashed) -> dict[int, Box]:
        """The box of every node that computing node `index` on `core` reads, back to the stashed nodes."""
        boxes = {index: core}
        for node_index in range(index, -1, -1):
            if node_index not in boxes or node_index in stashed:
                continue
            node = self.graph.nodes[node_index]
            for input_index, box in zip(node.inputs, node.step.needs(boxes[node_index]), strict=True):
                boxes[input_index] = boxes[input_index].union(box) if input_index in boxes else box
        return boxes

    # ---- the sweeps ----

    def new_stash(self, index: int) -> torch.Tensor:
        return torch.empty(self.shape(index), dtype=self.stash_dtype, device=self.stash_device, pin_memory=self.pin,
                           memory_format=self.memory_format)

    def sweep(self, sweep: Sweep, storage: torch.Tensor | None = None):
        """Compute a node on every tile's core, gather its statistics if asked, write it into `storage` if
        given.

        In place (`storage` is the stash `sweep.reuse`, which this sweep reads), a row of tiles is written only
        after the next row has been computed: until then its pixels are still read by the halos of its own
        row and the next one (`reusable` checks that no row reads further up); meanwhile both rows are held
        in the storage's dtype.
        """
        moments = Moments() if sweep.moments else None
        whole = Box.whole(*self.shape(sweep.index)[2:])
        pending: list[tuple[Box, torch.Tensor]] = []
        for row in range(len(self.rows)):
            done = []
            for col in range(len(self.cols)):
                core = self.core(sweep.index, row, col)
                y = self.evaluate(sweep.index, core)                              # (B, C, rows, cols)
                if moments is not None:
                    moments.add(y)
                if storage is None:
                    continue
                self.check_range(sweep.index, y, storage.dtype)
                if sweep.reuse is None:
                    core.of(storage, whole).copy_(y)
                else:
                    done.append((core, y.to(storage.dtype)))
            for core, y in pending:
                core.of(storage, whole).copy_(y)
            pending = done
        for core, y in pending:
            core.of(storage, whole).copy_(y)
        if moments is not None:
            self.moments[sweep.index] = moments

    def check_range(self, index: int, y: torch.Tensor, dtype: torch.dtype):
        """OverflowError if y, part of node `index`, holds values that `dtype` would turn into inf."""
        if dtype == y.dtype:
            return
        limit = torch.finfo(dtype).max
        low, high = torch.aminmax(y)
        peak = max(-low.item(), high.item())
        if peak > limit:
            raise OverflowError(
                f"exact tiling: activation {index} of the network reaches {peak:.4g}, "
                f"beyond {dtype}'s range (±{limit:.4g}) for kept activations; use a wider stash_dtype"
            )

    def evaluate(self, index: int, core: Box) -> torch.Tensor:
        """Node `index` on `core` (B, C, rows, cols), on the compute device, from the stashes."""
        boxes = self.boxes(index, core, self.stashes)
        last_use = {}
        for node_index in sorted(boxes):
            if node_index not in self.stashes:
                last_use.update(dict.fromkeys(self.graph.nodes[node_index].inputs, node_index))
        values = {}
        for node_index in sorted(boxes):
            box = boxes[node_index]
            if node_index in self.stashes:
                stash = self.stashes[node_index]
                values[node_index] = box.of(stash, Box.whole(*stash.shape[2:])).to(
                    self.device, self.dtype, non_blocking=True)
                continue
            node = self.graph.nodes[node_index]
            wanted = node.step.needs(box)
            inputs = [want.of(values[i], boxes[i]) for i, want in zip(node.inputs, wanted, strict=True)]
            y, y_box = node.step(inputs, wanted, self.affine(node_index))
            values[node_index] = box.of(y, y_box)
            for i in node.inputs:
                if last_use[i] == node_index:
                    del values[i]
        return values[index]

    def affine(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) on the compute device for node `index`'s GroupNorm, None if it has none."""
        node = self.graph.nodes[index]
        if node.step.norm is None:
            return None
        if index not in self.affines:
            scale, shift = self.moments[node.inputs[0]].affine(node.step.norm)
            self.affines[index] = (scale.to(self.device), shift.to(self.device))
        return self.affines[index]


@torch.no_grad()
def decode_exact(vae: AutoencoderKL, z: torch.Tensor, tile: int, stash_budget: int | None = None,
                 stash_device: str | torch.device = "cpu", stash_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Raw latents (B, C, h, w) -> images (B, 3, h*f, w*f): `vae.decode(z)` computed in tiles of at most
    `tile` x `tile` latent pixels, equal to it up to float rounding. See `ExactTiling` for the arguments."""
    if z.ndim != 4 or z.shape[1] != vae.config.latent_channels:
        raise ValueError(f"latents of shape {tuple(z.shape)}: expected (B, {vae.config.latent_channels}, h, w)")
    return ExactTiling(decoder_graph(vae), z, tile, stash_budget, stash_device, stash_dtype).run()


@torch.no_grad()
def encode_exact(vae: AutoencoderKL, x: torch.Tensor, tile: int, stash_budget: int | None = None,
                 stash_device: str | torch.device = "cpu", stash_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> moments (B, 2C, H/f, W/f): `vae.moments(x)` computed in tiles of at
    most `tile` x `tile` latent pixels (tile * f image pixels), equal to it up to float rounding."""
    factor = vae.config.downsampling_factor
    if x.ndim != 4 or x.shape[1] != vae.config.in_channels or x.shape[2] % factor or x.shape[3] % factor:
        raise ValueError(
            f"images of shape {tuple(x.shape)}: expected (B, {vae.config.in_channels}, H, W) with H and W "
            f"multiples of the downsampling factor {factor}"
        )
    return ExactTiling(encoder_graph(vae), x, tile, stash_budget, stash_device, stash_dtype).run()
