"""The medfuse fusion network: a low-resolution weight predictor over an à-trous base/detail split.

Design (why it is fast): every full-resolution operation is fixed and cheap (separable à-trous blurs,
a soft-max and a weighted sum); all learned convolutions run at 1/4 resolution. The network does not
synthesise pixels. Per input and per scale it predicts soft selection logits, and per scale a detail
gain, so the output stays on the inputs' scale, an all-zero input simply loses the selection, and an
any-number-of-inputs (2 or 3) model is one shared, permutation-equivariant encoder.

* Decomposition (per input ``x``): ``b1 = blur(x)``, ``b2 = blur_2(b1)``, ``b3 = blur_4(b2)`` (dilation 1, 2, 4 of
  a 5-tap binomial), details ``d1 = x - b1, d2 = b1 - b2, d3 = b2 - b3``, base ``b3``.
* Low-resolution features per input: 4×-average-pooled ``x`` and ``|d_l|``; a shared dilated-conv encoder;
  cross-input mixing by concatenating each input's features with the max and mean over inputs.
* Heads: per input, ``levels + 1`` selection logits (base and each detail level); shared, ``levels`` gain logits.
* Full resolution: ``w_base = softmax_i(up(logit) + k_b * b3_i)``, ``w_l = softmax_i(up(logit) + k_l * |d_l_i|)``,
  ``F = sum_i w_base_i b3_i + sum_l g_l * sum_i w_l_i d_l_i``, clipped to 0..1.
  Voxels where every input is 0 (at most ``NO_SIGNAL``, 1e-6) stay 0 (no halo into the background).
  The ``k`` terms let a pixel-sharp "pick the stronger detail / the brighter base" decision happen at full
  resolution at the cost of one multiply-add.
* Empty-input guard (``empty_guard=k``, on in the shipped weights): an input that is 0 (≤ 1e-6) over a k×k(×k)
  neighbourhood while another input is not gets no weight there, so what only one input shows is never
  traded for another input's empty background.
* 3-D (tri-plane): the same 2-D encoder/heads run on the axial, coronal and sagittal slices of the 4×-pooled
  volume; the three planes' logit volumes are merged by a learned 3×3×3 convex kernel (a soft-max over its
  81 taps, shared over maps: a local weighted average, never a high-pass) and trilinearly upsampled; the
  full-resolution combination is done with 3-D blurs. Nothing is stacked slice by slice at full resolution, so
  there is no slice-periodic artefact. With ``coarse_pixel_rule_3d=L`` (2 in the shipped weights) the L
  coarsest detail levels are chosen in 3-D by the "stronger detail" term, with the learned logits scaled down
  to ``coarse_rule_learned`` (0.005 in the shipped weights) beside it: it keeps a PET hot spot over a dark MR
  core, which the full learned choice hides. The 2-D path applies the same rule on request
  (``forward(coarse_pixel_rule=L)``; ``functional=True`` in :mod:`medfuse.fusion.infer`).
* 2-D refinement head (``refine=W``, 8 in the shipped weights): a small full-resolution network reads each
  pixel's neighbourhood (image, base, details, Sobel responses, base logit; own and maximum over the inputs)
  and corrects the upsampled selection logits before the combination. Qabf compares Sobel gradients pixel by
  pixel, which the 1/4-resolution maps only see blurred. The tri-plane path does not use it (cost).
* Optional global context (``scan=N``, off in the shipped weights): a four-direction selective scan after the
  mixing (:class:`SelectiveScan2d`). Measured in docs/network.md ("Sixth round"): 6x the 2-D time, no gain.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import CancelToken, ProgressFn, check, report

__all__ = ["FusionNet", "ConvexMerge3d", "SelectiveScan2d", "DEFAULT_CONFIG", "decompose", "HALO",
           "config_from_metadata"]

DEFAULT_CONFIG: Dict[str, int | float] = {"width": 16, "levels": 3, "factor": 4, "gain_min": 0.5, "gain_max": 2.0}

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
#: Full-resolution halo (voxels) one output voxel depends on through the à-trous blurs of the default 3 levels
#: (2 + 4 + 8); :func:`_blur_reach` gives it for any number of levels.
HALO = 14


def _blur_reach(levels: int) -> int:
    """Voxels each side that :func:`decompose` with ``levels`` levels reads.

    Args:
        levels: the number of detail levels (level ``l`` blurs with dilation ``2**l``, 5 taps).

    Returns:
        2·(1 + 2 + … + 2**(levels-1)): 14 for 3 levels.
    """
    return 2 * (2 ** int(levels) - 1)


def _blur_axis(x: torch.Tensor, axis: int, dilation: int) -> torch.Tensor:
    """5-tap binomial blur of a (B, C, *spatial) tensor along one spatial axis, reflect-padded.

    Written as shifted adds: a dilated depthwise convolution is far slower on the CPU (measured ~10x in 3-D).
    """
    nd = x.dim() - 2
    dim = 2 + axis
    n = x.shape[dim]
    pad = [0, 0] * nd
    idx = 2 * (nd - 1 - axis)  # F.pad lists pads from the last axis backwards
    pad[idx] = pad[idx + 1] = 2 * dilation
    xp = _reflect_pad(x, pad)
    d = dilation
    out = xp.narrow(dim, 0, n) + xp.narrow(dim, 4 * d, n)
    out = out + 4.0 * (xp.narrow(dim, d, n) + xp.narrow(dim, 3 * d, n))
    out = out + 6.0 * xp.narrow(dim, 2 * d, n)
    return out * (1.0 / 16.0)


def _reflect_pad(x: torch.Tensor, pad: List[int]) -> torch.Tensor:
    """Reflect padding that also works when the pad exceeds the axis length (falls back to replicate)."""
    nd = x.dim() - 2
    for i in range(nd):
        lo, hi = pad[2 * i], pad[2 * i + 1]
        if lo == 0 and hi == 0:
            continue
        size = x.shape[-1 - i]
        one = [0, 0] * nd
        one[2 * i], one[2 * i + 1] = lo, hi
        mode = "reflect" if max(lo, hi) < size else "replicate"
        x = F.pad(x, one, mode=mode)
    return x


def blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Separable binomial blur over every spatial axis of (B, C, *spatial)."""
    for axis in range(x.dim() - 2):
        x = _blur_axis(x, axis, dilation)
    return x


def decompose(x: torch.Tensor, levels: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """À-trous decomposition of (B, C, *spatial): returns (base, [d1 .. d_levels]) with x = base + sum(d).

    Args:
        x: a (B, C, *spatial) tensor, 1-3 spatial axes (every one of them is blurred).
        levels: detail levels; level ``l`` (from 0) blurs with dilation ``2**l`` (reflect padding; replicate
            where the pad is not shorter than the axis).

    Returns:
        ``(base, details)``: the last blur and the ``levels`` differences of successive blurs, finest first, all
        of ``x``'s shape.
    """
    details = []
    cur = x
    for lev in range(levels):
        nxt = blur(cur, 2 ** lev)
        details.append(cur - nxt)
        cur = nxt
    return cur, details


def _pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    return (F.avg_pool2d if x.dim() == 4 else F.avg_pool3d)(x, factor)


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)


def _conv(cin: int, cout: int, *, dilation: int = 1, act: bool = True) -> nn.Module:
    """A 3×3 conv (+LeakyReLU). Replicate padding: zero padding would read as a dark border at low resolution."""
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, padding_mode="replicate")]
    if act:
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


def _causal_decay(cum: torch.Tensor) -> torch.Tensor:
    """(..., L) cumulative log decays -> (..., L, L) with exp(cum_i - cum_j) for j <= i and 0 above."""
    n = cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=cum.device).tril()
    return (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def _ssd_scan(x: torch.Tensor, log_a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal selective scan ``h_t = a_t h_(t-1) + B_t x_t``, ``y_t = C_t · h_t``, computed chunk-parallel.

    Pure PyTorch (Mamba's CUDA kernels do not run on a CPU): inside a chunk of ``chunk`` steps the output is
    a masked ``chunk × chunk`` product (the state-space dual form), and the chunks' end states are carried
    by a second, chunk-level product. Cost is ``T·chunk + (T/chunk)²`` per channel: linear in T for a chunk
    near sqrt(T) (16 or 32 for the 4096 steps of a 64×64 map measured fastest).

    Args:
        x: (G, H, P, T) inputs, H heads of P channels.
        log_a: (G, H, T) log decays (≤ 0), one per head and step.
        b, c: (G, N, T) input and output projections of the N-dimensional state, shared by the heads.
        chunk: steps per chunk; T is padded up to a multiple of it at the end (causal, so harmless).

    Returns:
        (G, H, P, T).
    """
    g, h, p, t = x.shape
    n = b.shape[1]
    pad = (-t) % chunk
    if pad:
        x, log_a, b, c = (F.pad(v, (0, pad)) for v in (x, log_a, b, c))
    k = (t + pad) // chunk
    x = x.reshape(g, h, p, k, chunk)
    b = b.reshape(g, n, k, chunk)
    c = c.reshape(g, n, k, chunk)
    cum = log_a.reshape(g, h, k, chunk).cumsum(-1)  # (G, H, K, L)
    decay = _causal_decay(cum)  # (G, H, K, L, L)
    scores = torch.einsum("gnki,gnkj->gkij", c, b)[:, None] * decay  # (G, H, K, L, L)
    y = torch.einsum("ghkij,ghpkj->ghpki", scores, x)
    # State at the end of each chunk from that chunk's own inputs, then carried across chunks.
    to_end = (cum[..., -1:] - cum).exp()  # (G, H, K, L)
    states = torch.einsum("gnkj,ghpkj->ghkpn", b, x * to_end[:, :, None])  # (G, H, K, P, N)
    chunk_cum = cum[..., -1].cumsum(-1)  # (G, H, K)
    carry = _causal_decay(chunk_cum)  # (G, H, K, K)
    ends = torch.einsum("ghkm,ghmpn->ghkpn", carry, states)  # state after chunk k
    entering = torch.cat([torch.zeros_like(ends[:, :, :1]), ends[:, :, :-1]], dim=2)
    y = y + torch.einsum("gnki,ghkpn,ghki->ghpki", c, entering, cum.exp())
    return y.reshape(g, h, p, k * chunk)[..., :t]


class SelectiveScan2d(nn.Module):
    """A four-direction selective scan over a 2-D feature map: global context in linear time.

    The map is read as a sequence row by row and column by column, each forwards and backwards (the
    ClinicalFMamba / VMamba scan order); every direction has its own input-dependent step size and state
    projections (S6-style selectivity) and heads with scalar decays (Mamba-2 style). The four outputs are
    summed, gated, and projected by a zero-initialised 1×1 convolution, so the block starts as the identity
    when added as a residual.

    Args:
        channels: feature channels (a multiple of ``heads``).
        state: state size N.
        heads: heads sharing a decay.
        chunk: chunk length of the chunk-parallel scan.

    Raises:
        ValueError: ``channels`` is not a multiple of ``heads``.
    """

    def __init__(self, channels: int, *, state: int = 8, heads: int = 4, chunk: int = 16):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be a multiple of heads ({heads})")
        self.channels, self.state, self.heads, self.chunk = channels, state, heads, chunk
        self.per_dir = channels + heads + 2 * state
        self.proj = nn.Conv2d(channels, 4 * self.per_dir, 1)
        self.gate = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        # Decay rates 1..16 per head and step sizes 0.001..0.1 (log-spread), as Mamba initialises them.
        self.log_neg_a = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, heads)).repeat(4, 1))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), heads)).repeat(4, 1)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def _direction_pair(self, q: torch.Tensor, dirs: slice) -> torch.Tensor:
        """q: (B, 2, per_dir, a, b) for a forward and a backward scan along the flattened (a, b) order."""
        bsz, _, _, ha, wb = q.shape
        seq = q.flatten(-2)
        seq = torch.stack([seq[:, 0], seq[:, 1].flip(-1)], dim=1).flatten(0, 1)  # (B*2, per_dir, T)
        d, hd, n = self.channels, self.heads, self.state
        x, dt, b, c = seq.split([d, hd, n, n], dim=1)
        dt = F.softplus(dt + self.dt_bias[dirs].repeat(bsz, 1)[..., None])
        log_a = -self.log_neg_a[dirs].exp().repeat(bsz, 1)[..., None] * dt
        x = (x * dt.repeat_interleave(d // hd, dim=1)).reshape(bsz * 2, hd, d // hd, -1)
        y = _ssd_scan(x, log_a, b, c, self.chunk).reshape(bsz, 2, d, -1)
        y = y[:, 0] + y[:, 1].flip(-1)
        return y.reshape(bsz, d, ha, wb)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        bsz, _, hh, ww = m.shape
        p = self.proj(m).reshape(bsz, 4, self.per_dir, hh, ww)
        rows = self._direction_pair(p[:, 0:2], slice(0, 2))
        cols = self._direction_pair(p[:, 2:4].transpose(-1, -2), slice(2, 4)).transpose(-1, -2)
        return self.out((rows + cols) * F.silu(self.gate(m)))


#: Config keys whose values are floats (the rest are ints, and ``merge`` a string).
_FLOAT_CONFIG = ("gain_min", "gain_max", "coarse_rule_learned", "functional_k", "functional_base_learned",
                 "functional_coarse_learned")


def config_from_metadata(config: Dict[str, object]) -> Dict[str, object]:
    """FusionNet keyword arguments from a weights file's stored config (values may be strings).

    A file without a ``merge`` key predates the convex merge and was trained with the "conv" one.

    Args:
        config: the ``config`` entry of a weights file's metadata, JSON-decoded (:func:`FusionNet.config`'s keys).

    Returns:
        A new dict: ``merge`` as a str (``"conv"`` when absent), the float keys as floats, the rest as ints.

    Raises:
        ValueError: a value that does not read as a number, e.g. ``"abc"`` or ``"1.5"`` for an int key
            (:func:`medfuse.fusion.infer.load_model` reports either error as a :class:`~medfuse.errors.WeightsError`).
        TypeError: a value that is not a str or a number (None, a list).
    """
    out: Dict[str, object] = {"merge": "conv"}
    for k, v in config.items():
        out[k] = str(v) if k == "merge" else float(v) if k in _FLOAT_CONFIG else int(v)
    return out


class ConvexMerge3d(nn.Module):
    """Learned tri-plane merge: a 3×3×3 kernel over the three planes' logit volumes that is a soft-max.

    Its weights are non-negative and sum to one, so it is a local weighted average: it cannot become a
    high-pass. The unconstrained convolution it replaces (``merge="conv"``, the weights shipped before) was
    trained into one (centre ≈ 0.32, neighbours ≈ -0.0125, overall gain -0.05). That cancelled the learned
    selection in 3-D and amplified each plane's slice-to-slice jitter into stripes (docs/network.md,
    "Seventh round"). Starts as the plain mean of the three planes (centre taps ≈ 1/3 each).
    """

    def __init__(self):
        super().__init__()
        logits = torch.zeros(1, 3, 3, 3, 3)
        logits[0, :, 1, 1, 1] = math.log(300.0)  # centre weight 300 / (3·300 + 78) ≈ 0.307 per plane
        self.logits = nn.Parameter(logits)

    def kernel(self) -> torch.Tensor:
        return torch.softmax(self.logits.flatten(), 0).view_as(self.logits)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """(K, 3, d, h, w) -> (K, 1, d, h, w)."""
        return F.conv3d(F.pad(stacked, (1, 1, 1, 1, 1, 1), mode="replicate"), self.kernel())


def sobel2d(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sobel responses (x: right minus left, y: top minus bottom) of (B, C, H, W), replicate-padded.

    Separable shifted adds: about 4x faster on a CPU than a grouped 3×3 convolution.
    """
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    rows = p[..., 0:h, :] + 2.0 * p[..., 1:h + 1, :] + p[..., 2:h + 2, :]  # smoothed down the rows
    cols = p[..., :, 0:w] + 2.0 * p[..., :, 1:w + 1] + p[..., :, 2:w + 2]  # smoothed along the columns
    return rows[..., 2:w + 2] - rows[..., 0:w], cols[..., 0:h, :] - cols[..., 2:h + 2, :]


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, H, W) tensor as the contiguous (N, H, W, C) tensor it is in memory."""
    return t.permute(0, 2, 3, 1)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """A contiguous (N, H, W, C) tensor seen as channels-last (N, C, H, W), without a copy."""
    return t.permute(0, 3, 1, 2)


class RefineHead(nn.Module):
    """Full-resolution correction of the selection logits, from each pixel's neighbourhood (2-D path).

    Why: Qabf scores every pixel's Sobel gradient against each input's, so which input should win is decided
    at the scale of a few pixels; the 1/4-resolution maps only see it blurred (docs/network.md, "Twelfth
    round"). Per input it reads the image, its base, its details, its Sobel responses and its upsampled base
    logit, beside their maximum over the inputs (so it stays order-free for 2 or 3 inputs), through a 3×3
    convolution and two depthwise-separable ones (dilations 1, 2 and 4: a 15×15 field, plus the Sobel's
    pixel). Its output layer starts at zero, so a head added to trained weights starts as exactly those
    weights.
    """

    #: Pixels each side one output reads through the head: its 3×3 convolutions (dilations 1, 2, 4) and the Sobel.
    reach = 1 + 2 + 4 + 1

    def __init__(self, width: int, levels: int):
        super().__init__()
        # Per input: the image, its base, one map per detail level, two Sobel responses, their magnitude, the logit.
        nf = self.features = levels + 6
        self.own = nn.Conv2d(nf, width, 3, padding=1)
        self.shared = nn.Conv2d(nf, width, 3, padding=1, bias=False)
        # Depthwise-separable context layers: a 3×3 per channel, then a 1×1 mix (about 4x cheaper than a full
        # 3×3 at this width, which matters at full resolution).
        self.mid = nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=width)
        self.mid_mix = nn.Conv2d(width, width, 1)
        self.wide = nn.Conv2d(width, width, 3, padding=4, dilation=4, groups=width)
        self.wide_mix = nn.Conv2d(width, width, 1)
        self.out = nn.Conv2d(width, levels + 1, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, base: torch.Tensor, details: List[torch.Tensor],
                base_logit: torch.Tensor) -> torch.Tensor:
        """x, base, details, base_logit: (B, N, H, W) -> selection-logit corrections (B, N, levels+1, H, W)."""
        b, n = x.shape[:2]
        gx, gy = sobel2d(x * 4.0)
        # Stacked last, (B, N, H, W, F) is channels-last memory for the (B·N, F, H, W) view: oneDNN runs these
        # few-channel convolutions about 3x faster in it on a CPU, and no copy is needed to get there.
        f = torch.stack([x, base] + [d * 4.0 for d in details]
                        + [gx, gy, torch.sqrt(gx * gx + gy * gy + 1e-6), base_logit * 0.1], dim=-1)
        # conv(cat(f_i, max_i f_i)) split by linearity: the over-inputs part is computed once, not per input.
        # Element-wise over the inputs: a reduction over dim 1 of this layout is about 8x slower on a CPU.
        fmax = f[:, 0]
        for i in range(1, n):
            fmax = torch.maximum(fmax, f[:, i])
        # Element-wise work on the plain (…, H, W, C) views: PyTorch's CPU kernels are about 5x slower on the
        # same tensors seen as channels-last (N, C, H, W).
        z = _nhwc(self.own(_nchw(f.flatten(0, 1)))).unflatten(0, (b, n)) + _nhwc(self.shared(_nchw(fmax)))[:, None]
        z = F.leaky_relu_(z.flatten(0, 1), 0.1)
        z = F.leaky_relu_(_nhwc(self.mid_mix(self.mid(_nchw(z)))), 0.1)
        z = F.leaky_relu_(_nhwc(self.wide_mix(self.wide(_nchw(z)))), 0.1)
        return _nhwc(self.out(_nchw(z))).unflatten(0, (b, n)).permute(0, 1, 4, 2, 3)


#: Normalised inputs at or below this are "no signal" to the empty-input guard and the background rule. Not 0:
#: resampling leaves 1e-14 where the source was 0, and 96 such voxels in a SPECT's background switched the guard
#: off around them (up to 0.018 against the same SPECT reoriented exactly). An 8-bit image's least grey is 0.004.
NO_SIGNAL = 1e-6

#: The widest layer a weights file may ask for (the shipped network is 16 wide; 1024 is far past any trained here).
MAX_WIDTH = 1024


class FusionNet(nn.Module):
    """Fuses 2-3 co-registered images (2-D) or volumes (3-D, tri-plane), all scaled to 0..1.

    Args:
        width: channels of the low-resolution encoder.
        levels: number of à-trous detail levels.
        factor: downsampling factor of the learned part (power of two).
        per_input_gain: 1 for a detail gain per input and level, 0 for one gain per level shared by the inputs.
        gain_min, gain_max: the range of the detail gain the network can apply (bounded, so that a
            metric-driven loss cannot run the gain away); it must hold the initial gain 1 strictly inside.
        scan: state size of the optional global-context block (:class:`SelectiveScan2d`, 4 heads) after the
            mixing; 0: none (the shipped weights). Measured 6x the 2-D time for no gain (docs/network.md, "Sixth
            round").
        empty_guard: the empty-input guard's neighbourhood size (odd; see the module docstring); 0: off.
        merge: the tri-plane merge, "convex" (:class:`ConvexMerge3d`) or "conv" (an unconstrained 3×3×3
            convolution; weights files without a ``merge`` key were trained with it).
        coarse_pixel_rule_3d: in the 3-D path only, how many of the coarsest detail levels are chosen by the
            full-resolution pixel rule (the stronger detail wins, the classic multi-scale rule) instead of the
            learned selection (of which ``coarse_rule_learned`` stays). 0: none. The shipped weights use 2 (d2
            and d3), so that focal uptake in a PET/SPECT volume stays visible where the MR is dark
            (docs/network.md, "Ninth round").
        coarse_rule_learned: at the levels ``coarse_pixel_rule_3d`` leaves to the pixel rule, the factor (0..1) on
            the learned selection logits that stay beside the rule's term. 0: the pixel rule alone. The learned
            logits are saturated (hundreds), so a small factor turns them into a nudge of the size of the
            rule's own term; the shipped 0.005 lifts the 3-D phantom MR + PET past the max rule and keeps the
            hot spot (docs/network.md, "Fifteenth round").
        refine: width of the full-resolution refinement head (:class:`RefineHead`) of the 2-D path; 0: none.
            The tri-plane 3-D path does not use it (docs/network.md, "Twelfth round").
        functional_k: for volumes known to hold a functional (PET/SPECT) input, the sharpness of a "brighter
            wins" choice of the base and of the ``coarse_pixel_rule_3d`` coarsest detail levels: each input's
            weight there follows ``functional_k`` times its image blurred to that level, the same choice at
            every coarse scale, where the plain pixel rule picks the stronger detail level by level. 0: off (the
            plain pixel rule). Why: the coherent choice is the max rule's across scales, which keeps uptake as
            the max rule does and scores closer to it on Qabf (docs/network.md, "Sixteenth round").
        functional_base_learned, functional_coarse_learned: with ``functional_k``, the factors (0..1) on the
            learned selection logits of the base and of those coarse levels that stay beside it as a nudge.

    Raises:
        ValueError: ``refine`` < 0; ``merge`` neither "convex" nor "conv"; ``coarse_pixel_rule_3d`` outside
            0..``levels``; ``coarse_rule_learned``, ``functional_base_learned`` or ``functional_coarse_learned``
            outside 0..1; ``functional_k`` negative, infinite or NaN; ``empty_guard`` negative or even; ``scan``
            with a ``width`` that is not a multiple of 4; ``gain_min``..``gain_max`` not holding 1 strictly
            inside.
    """

    def __init__(self, *, width: int = 16, levels: int = 3, factor: int = 4, gain_min: float = 0.5,
                 gain_max: float = 2.0, per_input_gain: int = 0, scan: int = 0, empty_guard: int = 0,
                 merge: str = "convex", coarse_pixel_rule_3d: int = 0, coarse_rule_learned: float = 0.0,
                 refine: int = 0, functional_k: float = 0.0, functional_base_learned: float = 0.1,
                 functional_coarse_learned: float = 0.0075):
        super().__init__()
        # Bounds on the sizes a weights file's config may set: the model is built from them before any tensor is
        # compared, so width 4000 took 3.6 GB and 12 s to refuse, and factor 0 divided by zero at inference.
        for name, v, top in (("width", width, MAX_WIDTH), ("refine", refine, MAX_WIDTH), ("scan", scan, MAX_WIDTH),
                             ("levels", levels, 8), ("empty_guard", empty_guard, 63)):
            if not 0 <= v <= top or (name in ("width", "levels") and v < 1):
                raise ValueError(f"{name} must be {'1' if name in ('width', 'levels') else '0'}..{top}, got {v}")
        if not 1 <= factor <= 64 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two from 1 to 64, got {factor}")
        if refine < 0:
            raise ValueError(f"refine must be 0 (off) or the refinement head's width, got {refine}")
        if merge not in ("convex", "conv"):
            raise ValueError(f'merge must be "convex" or "conv", got {merge!r}')
        if not 0 <= coarse_pixel_rule_3d <= levels:
            raise ValueError(f"coarse_pixel_rule_3d must be 0..{levels} (detail levels), got {coarse_pixel_rule_3d}")
        self.merge = merge
        self.coarse_pixel_rule_3d = int(coarse_pixel_rule_3d)
        if not 0.0 <= coarse_rule_learned <= 1.0:
            raise ValueError(f"coarse_rule_learned must be in 0..1, got {coarse_rule_learned}")
        self.coarse_rule_learned = float(coarse_rule_learned)
        if not 0.0 <= functional_k < math.inf:  # also refuses NaN
            raise ValueError(f"functional_k must be a finite value >= 0, got {functional_k}")
        for name, v in (("functional_base_learned", functional_base_learned),
                        ("functional_coarse_learned", functional_coarse_learned)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {v}")
        self.functional_k = float(functional_k)
        self.functional_base_learned = float(functional_base_learned)
        self.functional_coarse_learned = float(functional_coarse_learned)
        if empty_guard < 0 or (empty_guard and empty_guard % 2 == 0):
            raise ValueError(f"empty_guard must be 0 (off) or an odd neighbourhood size, got {empty_guard}")
        self.empty_guard = int(empty_guard)
        self.scan_state = int(scan)
        self.per_input_gain = int(per_input_gain)
        self.width, self.levels, self.factor = int(width), int(levels), int(factor)
        self.gain_min, self.gain_max = float(gain_min), float(gain_max)
        if not self.gain_min < 1.0 < self.gain_max:  # the gain starts at 1 (the bias below is its logit)
            raise ValueError(f"gain_min < 1 < gain_max is needed, got {gain_min}..{gain_max}")
        cin = 1 + self.levels
        w = self.width
        self.encoder = nn.Sequential(_conv(cin, w), _conv(w, w, dilation=2), _conv(w, w, dilation=4))
        self.mix = nn.Sequential(_conv(3 * w, w), _conv(w, w, dilation=2))
        # Optional global context after the cross-input mixing (0: none, the shipped weights' architecture).
        self.scan = SelectiveScan2d(w, state=self.scan_state) if self.scan_state else None
        self.select = nn.Conv2d(w, self.levels + 1, 1)
        # Optional full-resolution correction of the selection logits (2-D path only; 0: none).
        self.refine_width = int(refine)
        self.refine = RefineHead(self.refine_width, self.levels) if self.refine_width else None
        self.gain = nn.Conv2d(w, self.levels, 1)
        # Full-resolution sharpness of the base (brighter wins) and detail (stronger wins) choices.
        self.log_k_base = nn.Parameter(torch.tensor(math.log(8.0)))
        self.log_k_detail = nn.Parameter(torch.full((self.levels,), math.log(30.0)))
        # Tri-plane aggregation: 3 planes -> 1, 3×3×3, shared over every logit map.
        self.agg: nn.Module = ConvexMerge3d() if merge == "convex" else \
            nn.Conv3d(3, 1, 3, padding=1, padding_mode="replicate")
        with torch.no_grad():
            if merge == "conv":
                self.agg.weight.zero_()
                self.agg.weight[0, :, 1, 1, 1] = 1.0 / 3.0
                self.agg.bias.zero_()
            self.select.weight.mul_(0.1)
            self.select.bias.zero_()
            self.gain.weight.mul_(0.1)
            frac = (1.0 - self.gain_min) / (self.gain_max - self.gain_min)
            self.gain.bias.fill_(math.log(frac / (1.0 - frac)))  # initial gain 1.0

    def channels_last_(self) -> "FusionNet":
        """Keep the low-resolution convolutions' weights in channels-last memory, for inference.

        oneDNN runs these few-channel convolutions faster so on a CPU (the low-resolution part of a 256² pair:
        8.8 -> 5.2 ms) with the same logits to about 1e-4. Training leaves them as they are, so that the
        shipped training commands give the tensors they gave.
        """
        for mod in (self.encoder, self.mix, self.select, self.gain):
            mod.to(memory_format=torch.channels_last)
        return self

    def config(self) -> Dict[str, int | float]:
        cfg: Dict[str, int | float] = {"width": self.width, "levels": self.levels, "factor": self.factor,
                                        "gain_min": self.gain_min, "gain_max": self.gain_max}
        if self.per_input_gain:
            cfg["per_input_gain"] = 1
        if self.scan_state:
            cfg["scan"] = self.scan_state
        if self.empty_guard:
            cfg["empty_guard"] = self.empty_guard
        cfg["merge"] = self.merge
        if self.coarse_pixel_rule_3d:
            cfg["coarse_pixel_rule_3d"] = self.coarse_pixel_rule_3d
        if self.coarse_rule_learned:
            cfg["coarse_rule_learned"] = self.coarse_rule_learned
        if self.refine_width:
            cfg["refine"] = self.refine_width
        if self.functional_k:
            cfg["functional_k"] = self.functional_k
            cfg["functional_base_learned"] = self.functional_base_learned
            cfg["functional_coarse_learned"] = self.functional_coarse_learned
        return cfg

    @property
    def has_brighter_rule(self) -> bool:
        """Whether these weights give volumes with a known functional input the "brighter wins" choice."""
        return self.functional_k > 0 and self.coarse_pixel_rule_3d > 0

    @property
    def halo(self) -> int:
        """Full-resolution voxels one output voxel depends on, each side (blurs plus the empty-input guard).

        From the weights' own number of levels: a fixed 14 (3 levels) left seams between the 3-D path's slabs
        of up to 0.06 for weights with 5 levels.
        """
        return _blur_reach(self.levels) + self.empty_guard // 2

    def halo_2d(self, refine: bool = True) -> int:
        """:attr:`halo` for the 2-D path: plus the refinement head's field (if it has one and ``refine``), which
        reads the details that many pixels further out."""
        return self.halo + (RefineHead.reach if refine and self.refine is not None else 0)

    def empty_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, *S) bool: input i is 0 (at most :data:`NO_SIGNAL`) in the guard neighbourhood of a voxel where
        another is not.

        Exactly 0 marks "no signal here" (outside a modality's field of view or body, a masked region), not a
        dark tissue value, so choosing that input would erase what another input shows.
        """
        k = self.empty_guard
        pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
        # The mean of the "has signal" indicator is 0 only if the whole neighbourhood is 0; it is about 3x
        # faster on a CPU than a max-pool of the values.
        has = x > NO_SIGNAL
        return (pool(has.to(x.dtype), k, 1, k // 2) == 0) & has.any(dim=1, keepdim=True)

    # ------------------------------------------------------------------ low resolution (2-D slices)
    def _features(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """x: (B, N, *spatial) -> base, details, pooled features (B, N, 1+levels, *spatial/f)."""
        base, details = decompose(x, self.levels)
        feats = [_pool(x, self.factor)] + [_pool(d.abs(), self.factor) for d in details]
        return base, details, torch.stack(feats, dim=2)

    def lowres_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, C, h, w) -> (B, N*(levels+1) + levels, h, w): selection logits then gain logits."""
        b, n, c, h, w = feats.shape
        f = self.encoder(feats.reshape(b * n, c, h, w) * 4.0 - 1.0)
        f = f.reshape(b, n, self.width, h, w)
        fmax = f.max(dim=1, keepdim=True).values.expand_as(f)
        fmean = f.mean(dim=1, keepdim=True).expand_as(f)
        m = self.mix(torch.cat([f, fmax, fmean], dim=2).reshape(b * n, 3 * self.width, h, w))
        if self.scan is not None:
            m = m + self.scan(m)
        sel = self.select(m).reshape(b, n * (self.levels + 1), h, w)
        if self.per_input_gain:
            gain = self.gain(m).reshape(b, n * self.levels, h, w)
        else:
            gain = self.gain(m.reshape(b, n, self.width, h, w).mean(dim=1))
        return torch.cat([sel, gain], dim=1)

    # ------------------------------------------------------------------ full resolution
    def combine(self, x: torch.Tensor, base: torch.Tensor, details: List[torch.Tensor],
                logits_up: torch.Tensor, *, empty: torch.Tensor | None = None,
                brighter: bool = False) -> torch.Tensor:
        """Full-resolution weighted base/detail sum. Shapes: x (B, N, *S); logits_up (B, K, *S).

        ``empty`` is :meth:`empty_mask` of ``x``; pass it when ``x`` is a crop of a larger input (a slab), so
        that the guard sees the crop's neighbours. It is computed from ``x`` when not given.
        ``brighter`` (with ``functional_k``): the base and the ``coarse_pixel_rule_3d`` coarsest levels go to
        the input that is brighter at that scale, instead of the brighter base and the stronger detail.
        """
        n, lv = x.shape[1], self.levels
        sel = logits_up[:, : n * (lv + 1)].reshape(x.shape[0], n, lv + 1, *x.shape[2:])
        if self.empty_guard:
            if empty is None:
                empty = self.empty_mask(x)
            # A large finite logit, not -inf: at least one input is never masked, and bf16 stays finite.
            sel = sel.masked_fill(empty[:, :, None], -1e4)
        gain = logits_up[:, n * (lv + 1):]
        brighter = brighter and self.has_brighter_rule
        wb = torch.softmax(sel[:, :, 0] + (self.functional_k if brighter else self.log_k_base.exp()) * base, dim=1)
        out = (wb * base).sum(dim=1)
        kd = self.log_k_detail.exp()
        term: List[Optional[torch.Tensor]] = [None] * lv
        if brighter:
            coarse = base
            for lev in range(lv - 1, lv - 1 - self.coarse_pixel_rule_3d, -1):
                coarse = coarse + details[lev]  # the image blurred to this level: base + this and coarser levels
                term[lev] = self.functional_k * coarse
        for lev, d in enumerate(details):
            score = kd[lev] * d.abs() if term[lev] is None else term[lev]
            wd = torch.softmax(sel[:, :, lev + 1] + score, dim=1)
            if self.per_input_gain:
                g = self.gain_min + (self.gain_max - self.gain_min) * torch.sigmoid(gain[:, lev::lv])  # (B, N, *S)
                out = out + (g * wd * d).sum(dim=1)
            else:
                g = self.gain_min + (self.gain_max - self.gain_min) * torch.sigmoid(gain[:, lev])
                out = out + g * (wd * d).sum(dim=1)
        # Where every input is 0 (<= NO_SIGNAL: the background outside the body) the output is 0 too: blurred
        # bases and amplified details would otherwise leave a faint halo there, which SSIM punishes hard.
        support = (x.amax(dim=1) > NO_SIGNAL).to(out.dtype)
        return out.clamp(0.0, 1.0) * support

    # ------------------------------------------------------------------ public forward passes
    def forward(self, x: torch.Tensor, *, refine: bool = True, coarse_pixel_rule: int = 0) -> torch.Tensor:
        """2-D: x (B, N, H, W) in 0..1, H and W multiples of ``factor`` -> (B, H, W).

        ``refine=False`` skips the refinement head (if the model has one): the low-resolution choice alone.
        ``coarse_pixel_rule=L`` leaves the L coarsest detail levels to the "stronger detail" term, as the 3-D
        path does for functional inputs (0, the default: the learned choice everywhere).
        """
        base, details, feats = self._features(x)
        return self.render(x, base, details, self.lowres_logits(feats), refine=refine,
                           coarse_pixel_rule=coarse_pixel_rule)

    def render(self, x: torch.Tensor, base: torch.Tensor, details: List[torch.Tensor], lowres: torch.Tensor, *,
               refine: bool = True, coarse_pixel_rule: int = 0) -> torch.Tensor:
        """2-D full-resolution part: low-resolution logits (B, K, h, w) -> fused (B, H, W).

        Upsamples the logits, lets the refinement head (if any, and ``refine``) correct the selection, leaves
        the ``coarse_pixel_rule`` coarsest detail levels to the pixel rule (after the head, so that it cannot
        undo it), and combines the inputs' layers. :func:`medfuse.fusion.targets.optimise_mixing` renders its
        maps with it.
        """
        return self.render_upsampled(x, base, details, _up(lowres, self.factor), refine=refine,
                                     coarse_pixel_rule=coarse_pixel_rule)

    def render_upsampled(self, x: torch.Tensor, base: torch.Tensor, details: List[torch.Tensor],
                         logits: torch.Tensor, *, refine: bool = True, coarse_pixel_rule: int = 0) -> torch.Tensor:
        """:meth:`render` from logits already upsampled to ``x``'s size (B, K, H, W): a strip of a larger
        image brings the rows of the whole image's logits that fall on it."""
        if refine and self.refine is not None:
            logits = self.refined(x, base, details, logits)
        if coarse_pixel_rule:
            logits = self._leave_to_pixel_rule(logits, x.shape[1], coarse_pixel_rule, dim=1)
        return self.combine(x, base, details, logits)

    def _leave_to_pixel_rule(self, logits: torch.Tensor, n: int, rule: int, *, dim: int,
                             brighter: bool = False) -> torch.Tensor:
        """``logits`` with the learned selection of the ``rule`` coarsest detail levels scaled by
        ``coarse_rule_learned`` (0: set to 0); the maps (selection then gain) lie along ``dim``. A zero or small
        logit leaves the choice to the "stronger detail wins" term of :meth:`combine`. ``brighter`` (with
        ``functional_k``): those levels are scaled by ``functional_coarse_learned`` and the base by
        ``functional_base_learned`` instead, for :meth:`combine`'s "brighter wins" choice."""
        if not 0 <= rule <= self.levels:
            raise ValueError(f"coarse_pixel_rule must be 0..{self.levels} (detail levels), got {rule}")
        lv1 = self.levels + 1
        keep = torch.ones(lv1, dtype=logits.dtype, device=logits.device)
        if brighter and self.has_brighter_rule:
            keep[0] = self.functional_base_learned
            keep[lv1 - rule:] = self.functional_coarse_learned
        else:
            keep[lv1 - rule:] = self.coarse_rule_learned
        shape = [1] * (logits.dim() + 1)
        shape[dim + 1] = lv1
        sel = logits.narrow(dim, 0, n * lv1).unflatten(dim, (n, lv1)) * keep.view(shape)
        rest = logits.narrow(dim, n * lv1, logits.shape[dim] - n * lv1)
        return torch.cat([sel.flatten(dim, dim + 1), rest], dim=dim)

    def refined(self, x: torch.Tensor, base: torch.Tensor, details: List[torch.Tensor],
                logits_up: torch.Tensor) -> torch.Tensor:
        """Upsampled 2-D logits (B, K, H, W) with the refinement head's corrections added to the selection part."""
        b, n = x.shape[:2]
        lv1 = self.levels + 1
        sel = logits_up[:, : n * lv1]
        sel5 = sel.unflatten(1, (n, lv1))
        delta = self.refine(x, base, details, sel5[:, :, 0])
        # Added in the (B, N, levels+1, H, W) shape: ``delta`` is a strided view, read once, never copied.
        return torch.cat([(sel5 + delta).flatten(1, 2), logits_up[:, n * lv1:]], dim=1)

    def _merge_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """The tri-plane merge of an already replicate-padded (K, 3, d+2, h+2, w+2) stack -> (K, d, h, w):
        the convolution :attr:`agg`'s forward runs after padding."""
        if isinstance(self.agg, ConvexMerge3d):
            return F.conv3d(padded, self.agg.kernel())[:, 0]
        return F.conv3d(padded, self.agg.weight, self.agg.bias)[:, 0]

    def planes_logits(self, feats3: torch.Tensor, *, batch: int = 64,
                      coarse_pixel_rule: Optional[int] = None, brighter: bool = False,
                      merge_depth: Optional[int] = None, cancel: Optional[CancelToken] = None,
                      progress: Optional[ProgressFn] = None) -> torch.Tensor:
        """Tri-plane low-resolution logits. feats3: (N, C, d, h, w) pooled volume features -> (K, d, h, w).

        The 2-D encoder/heads run on the slices of each of the three planes (``batch`` slices at a time,
        which bounds memory); the three logit volumes are merged by the learned 3-D aggregation. The
        selection maps of the ``coarse_pixel_rule`` coarsest detail levels (default: the model's
        ``coarse_pixel_rule_3d``) are then scaled by ``coarse_rule_learned`` (0: set to 0); with ``brighter``
        (a functional input, and ``functional_k`` set) as :meth:`_leave_to_pixel_rule` says.

        ``merge_depth``: low-resolution slices (along the first axis) merged at a time, each with the one
        neighbour slice a side that the 3×3×3 kernel reads (None: the whole volume in one call). The same
        convolution over every map, on the same replicate-padded values, gives the same logits to the bit,
        without the stacked (maps, 3 planes) volume, its padded copy and the convolution's buffers for all of
        it at once (about 1 GB at clinical size). Inference merges a few slices at a time
        (:data:`medfuse.fusion.infer.MERGE_SLICES`); training merges in one call, as it always did.

        ``cancel`` (a :class:`medfuse.progress.CancelToken`) is checked before every batch and every merge call
        (:class:`medfuse.errors.CancelledError`); ``progress(fraction, message)`` is called after each.
        Why: at clinical size this step runs for tens of seconds, and Ctrl-C or a Cancel button waited for it.
        """
        rule = self.coarse_pixel_rule_3d if coarse_pixel_rule is None else int(coarse_pixel_rule)
        n, c = feats3.shape[:2]
        depth = feats3.shape[2]
        chunk = depth if merge_depth is None else max(1, int(merge_depth))
        steps = sum(-(-feats3.shape[2 + axis] // batch) for axis in range(3)) + -(-depth // chunk)
        done = 0
        per_plane = []
        for axis in range(3):
            # Move the through-plane axis first: (S, N, C, a, b).
            v = feats3.movedim(2 + axis, 0)
            outs = []
            for i in range(0, v.shape[0], batch):
                check(cancel, "network fusion")
                outs.append(self.lowres_logits(v[i:i + batch]))
                done += 1
                report(progress, done / (steps + 1), "network fusion: tri-plane")
            per_plane.append(torch.cat(outs, 0).movedim(0, 1 + axis))  # (K, d, h, w)
            del outs
        if chunk >= depth:
            check(cancel, "network fusion")
            stacked = torch.stack(per_plane, dim=1)  # (K, 3, d, h, w)
            del per_plane
            merged = self.agg(stacked)[:, 0]
            del stacked
        else:
            merged = per_plane[0].new_empty(per_plane[0].shape)
            for s in range(0, depth, chunk):
                check(cancel, "network fusion")
                e = min(depth, s + chunk)
                # Slices s-1 .. e (clamped: the replicate padding along the depth), then padded in-plane: the
                # values of the whole padded stack's slices s .. e+1.
                rows = torch.arange(s - 1, e + 1, device=merged.device).clamp_(0, depth - 1)
                piece = torch.stack([p.index_select(1, rows) for p in per_plane], dim=1)  # (K, 3, e-s+2, h, w)
                merged[:, s:e] = self._merge_padded(F.pad(piece, (1, 1, 1, 1, 0, 0), mode="replicate"))
                del piece
                done += 1
                report(progress, done / (steps + 1), "network fusion: tri-plane")
            del per_plane
        if rule:
            merged = self._leave_to_pixel_rule(merged, n, rule, dim=0, brighter=brighter)
        return merged
