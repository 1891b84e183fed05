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
  Voxels where every input is exactly 0 stay 0 (no halo into the background).
  The ``k`` terms let a pixel-sharp "pick the stronger detail / the brighter base" decision happen at full
  resolution at the cost of one multiply-add.
* 3-D (tri-plane): the same 2-D encoder/heads run on the axial, coronal and sagittal slices of the 4×-pooled
  volume; the three planes' logit volumes are merged by a learned 3×3×3 convolution (shared over maps, 82
  parameters) and trilinearly upsampled; the full-resolution combination is done with 3-D blurs. Nothing is
  stacked slice by slice at full resolution, so there is no slice-periodic artefact.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FusionNet", "DEFAULT_CONFIG", "decompose", "HALO"]

DEFAULT_CONFIG: Dict[str, int | float] = {"width": 16, "levels": 3, "factor": 4, "gain_min": 0.5, "gain_max": 2.0}

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)
#: Full-resolution halo (voxels) one output voxel depends on through the à-trous blurs (2 + 4 + 8).
HALO = 14


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
    """À-trous decomposition of (B, C, *spatial): returns (base, [d1 .. d_levels]) with x = base + sum(d)."""
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


class FusionNet(nn.Module):
    """Fuses 2-3 co-registered images (2-D) or volumes (3-D, tri-plane), all scaled to 0..1.

    Args:
        width: channels of the low-resolution encoder.
        levels: number of à-trous detail levels.
        factor: downsampling factor of the learned part (power of two).
        per_input_gain: 1 for a detail gain per input and level, 0 for one gain per level shared by the inputs.
        gain_min, gain_max: the range of the detail gain the network can apply (bounded, so that a
            metric-driven loss cannot run the gain away).
    """

    def __init__(self, *, width: int = 16, levels: int = 3, factor: int = 4, gain_min: float = 0.5,
                 gain_max: float = 2.0, per_input_gain: int = 0):
        super().__init__()
        self.per_input_gain = int(per_input_gain)
        self.width, self.levels, self.factor = int(width), int(levels), int(factor)
        self.gain_min, self.gain_max = float(gain_min), float(gain_max)
        cin = 1 + self.levels
        w = self.width
        self.encoder = nn.Sequential(_conv(cin, w), _conv(w, w, dilation=2), _conv(w, w, dilation=4))
        self.mix = nn.Sequential(_conv(3 * w, w), _conv(w, w, dilation=2))
        self.select = nn.Conv2d(w, self.levels + 1, 1)
        self.gain = nn.Conv2d(w, self.levels, 1)
        # Full-resolution sharpness of the base (brighter wins) and detail (stronger wins) choices.
        self.log_k_base = nn.Parameter(torch.tensor(math.log(8.0)))
        self.log_k_detail = nn.Parameter(torch.full((self.levels,), math.log(30.0)))
        # Tri-plane aggregation: 3 planes -> 1, 3×3×3, shared over every logit map.
        self.agg = nn.Conv3d(3, 1, 3, padding=1, padding_mode="replicate")
        with torch.no_grad():
            self.agg.weight.zero_()
            self.agg.weight[0, :, 1, 1, 1] = 1.0 / 3.0
            self.agg.bias.zero_()
            self.select.weight.mul_(0.1)
            self.select.bias.zero_()
            self.gain.weight.mul_(0.1)
            frac = (1.0 - self.gain_min) / (self.gain_max - self.gain_min)
            self.gain.bias.fill_(math.log(frac / (1.0 - frac)))  # initial gain 1.0

    def config(self) -> Dict[str, int | float]:
        cfg: Dict[str, int | float] = {"width": self.width, "levels": self.levels, "factor": self.factor,
                                        "gain_min": self.gain_min, "gain_max": self.gain_max}
        if self.per_input_gain:
            cfg["per_input_gain"] = 1
        return cfg

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
        sel = self.select(m).reshape(b, n * (self.levels + 1), h, w)
        if self.per_input_gain:
            gain = self.gain(m).reshape(b, n * self.levels, h, w)
        else:
            gain = self.gain(m.reshape(b, n, self.width, h, w).mean(dim=1))
        return torch.cat([sel, gain], dim=1)

    # ------------------------------------------------------------------ full resolution
    def combine(self, x: torch.Tensor, base: torch.Tensor, details: List[torch.Tensor],
                logits_up: torch.Tensor) -> torch.Tensor:
        """Full-resolution weighted base/detail sum. Shapes: x (B, N, *S); logits_up (B, K, *S)."""
        n, lv = x.shape[1], self.levels
        sel = logits_up[:, : n * (lv + 1)].reshape(x.shape[0], n, lv + 1, *x.shape[2:])
        gain = logits_up[:, n * (lv + 1):]
        wb = torch.softmax(sel[:, :, 0] + self.log_k_base.exp() * base, dim=1)
        out = (wb * base).sum(dim=1)
        kd = self.log_k_detail.exp()
        for lev, d in enumerate(details):
            wd = torch.softmax(sel[:, :, lev + 1] + kd[lev] * d.abs(), dim=1)
            if self.per_input_gain:
                g = self.gain_min + (self.gain_max - self.gain_min) * torch.sigmoid(gain[:, lev::lv])  # (B, N, *S)
                out = out + (g * wd * d).sum(dim=1)
            else:
                g = self.gain_min + (self.gain_max - self.gain_min) * torch.sigmoid(gain[:, lev])
                out = out + g * (wd * d).sum(dim=1)
        # Where every input is exactly 0 (the background outside the body) the output is 0 too: blurred
        # bases and amplified details would otherwise leave a faint halo there, which SSIM punishes hard.
        support = (x.amax(dim=1) > 0).to(out.dtype)
        return out.clamp(0.0, 1.0) * support

    # ------------------------------------------------------------------ public forward passes
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """2-D: x (B, N, H, W) in 0..1, H and W multiples of ``factor`` -> (B, H, W)."""
        base, details, feats = self._features(x)
        logits = _up(self.lowres_logits(feats), self.factor)
        return self.combine(x, base, details, logits)

    def planes_logits(self, feats3: torch.Tensor, *, batch: int = 64) -> torch.Tensor:
        """Tri-plane low-resolution logits. feats3: (N, C, d, h, w) pooled volume features -> (K, d, h, w).

        The 2-D encoder/heads run on the slices of each of the three planes (``batch`` slices at a time,
        which bounds memory); the three logit volumes are merged by the learned 3-D aggregation.
        """
        n, c = feats3.shape[:2]
        per_plane = []
        for axis in range(3):
            # Move the through-plane axis first: (S, N, C, a, b).
            v = feats3.movedim(2 + axis, 0)
            outs = [self.lowres_logits(v[i:i + batch]) for i in range(0, v.shape[0], batch)]
            per_plane.append(torch.cat(outs, 0).movedim(0, 1 + axis))  # (K, d, h, w)
        stacked = torch.stack(per_plane, dim=1)  # (K, 3, d, h, w)
        return self.agg(stacked)[:, 0]
