"""The SD UNet and VAE with fewer and faster round trips of their activations through device memory.

:func:`prepare_unet` changes how diffusers' modules run, never what they compute:

* **Upsampling in the channels-last layout** (``nhwc-up`` and ``fast``). diffusers' ``Upsample2D``
  makes its input contiguous in the channels-first layout at a batch of 64 or more (a workaround
  for the eager NHWC nearest-neighbour kernel, diffusers issue 984). Compiled, the upsampling is
  Inductor's own kernel and the copy is not needed; keeping the layout measured no difference on an
  H200 (docs/performance.md, run 69) but is exact (a nearest-neighbour upsampling copies the
  values). Run eagerly (not compiled), the module keeps diffusers' forward.
* **GroupNorm (+ SiLU) by one Triton path** (``fast``). Each ``ResnetBlock2D``'s two
  ``norm → SiLU`` (the second with the time embedding's add before it; resnets with diffusers'
  default time-embedding norm, or its ``group`` norm without a time projection as the VAE decoder's
  up blocks have, which computes the same), each transformer's input GroupNorm and the output
  GroupNorm + SiLU run as
  :func:`group_norm_act` where the activation has at least ``KERNEL_MIN_ELEMENTS`` elements (0:
  every size; ``prepare_unet`` can give a model its own rule, as the optimized path does where the
  host calls the model each step): statistics per (sample, group) in one pass over the
  channels-last activation (a program per sample, range of pixels and block of channels; every
  channel's partial mean and sum of squared deviations, merged per group as Chan's parallel
  variance), then normalize, scale, shift and SiLU in a second pass; up to
  ``MERGE_MAX_ELEMENTS`` the statistics programs take whole groups and each normalizing program
  merges its groups' partials itself (two launches, not three); for small activations
  (``SINGLE_MAX_PIXELS``, ``SINGLE_MAX_ELEMENTS``) both in one kernel, a program per sample and
  group. Off the GPU, for other layouts and where triton is missing, the library's ops.

The arithmetic is the library's: the time embedding's add rounded to the activation's dtype, the
norm in float32 rounded once, the SiLU of that rounded value (within one float16 unit of
``F.group_norm``; CPU tests run the kernels in triton's interpreter against float64).
"""

from __future__ import annotations

import functools
import types
from typing import Any

__all__ = ["UNET_FORMS", "KERNEL_MIN_ELEMENTS", "MERGE_MAX_ELEMENTS", "STAT_ROWS", "STAT_WARPS", "STAT_TILE_SUM", "STAT_PROGRAMS",
           "EAGER_KERNEL_MIN_ELEMENTS", "kernel_rule", "takes_kernels", "SINGLE_MAX_PIXELS", "SINGLE_MAX_ELEMENTS", "SINGLE_TILE", "SINGLE_WARPS",
           "check_unet_form", "prepare_unet", "time_table", "time_table_refusal", "kv_table", "kv_table_refusal",
           "kv_rows", "group_norm_act",
           "group_norm_act_reference", "group_norm_act_triton", "GroupNormAct"]

UNET_FORMS = ("library", "nhwc-up", "fast")


def check_unet_form(form: str, *, source: str = "unet_form") -> str:
    """``form`` if it is ``auto`` or one of ``UNET_FORMS``; else a ``ValueError`` naming it and ``source``."""
    if form != "auto" and form not in UNET_FORMS:
        raise ValueError(f"{source} must be 'auto' or one of {', '.join(repr(f) for f in UNET_FORMS)}, got {form!r}")
    return form


# -- the kernels ---------------------------------------------------------------------------------

@functools.cache
def _kernels() -> tuple[Any, Any, Any, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def _gn_partial(x_ptr, t_ptr, t_sn, mean_ptr, m2_ptr, HW, S, CB, G, C: tl.constexpr, R: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr, HAS_T: tl.constexpr, TILE_SUM: tl.constexpr,
                    GROUPED: tl.constexpr = False, CG: tl.constexpr = 1, GB: tl.constexpr = 1,
                    GBP: tl.constexpr = 1):
        # Program (n, s, cb): pixels [s·R, s·R + R) of sample n, channels [cb·BC, cb·BC + BC) (or,
        # GROUPED, the GB whole groups [cb·GB, cb·GB + GB) in BC lanes). The values are shifted by
        # the range's first pixel (no cancellation for activations near that value) and summed with
        # their squares per channel: per lane over the loop and across the tile's rows once at the
        # end, or (TILE_SUM) across each tile's rows as it arrives (small accumulators: more
        # programs resident, more loads in flight). At the end, per channel (or, GROUPED, per group:
        # its channels merged as Chan's parallel variance), the mean and the sum of squared
        # deviations of the range.
        pid = tl.program_id(0)
        cb = pid % CB
        s = (pid // CB) % S
        n = pid // (CB * S)
        rows = tl.arange(0, BR)
        lane = tl.arange(0, BC)
        if GROUPED:
            cols = cb * (GB * CG) + lane
            cm = (lane < GB * CG) & (cols < C)
        else:
            cols = cb * BC + lane
            cm = cols < C
        base = n.to(tl.int64) * HW * C
        first = s * R
        k = tl.load(x_ptr + base + first.to(tl.int64) * C + cols, mask=cm, other=0.0)
        if HAS_T:
            tv = tl.load(t_ptr + n * t_sn + cols, mask=cm, other=0.0).to(tl.float32)
            k = (k.to(tl.float32) + tv).to(x_ptr.dtype.element_ty)
        k = k.to(tl.float32)
        cnt_i = tl.minimum(HW - first, R)
        if TILE_SUM:
            s1 = tl.zeros((BC,), dtype=tl.float32)
            s2 = tl.zeros((BC,), dtype=tl.float32)
        else:
            acc1 = tl.zeros((BR, BC), dtype=tl.float32)
            acc2 = tl.zeros((BR, BC), dtype=tl.float32)
        for r0 in range(0, R, BR):   # R fits the pixels (_rows_per_program): only the last range has a tail
            p = first + r0 + rows
            m = (p < HW)[:, None] & cm[None, :]
            v = tl.load(x_ptr + base + p[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0)
            if HAS_T:
                v = (v.to(tl.float32) + tv[None, :]).to(x_ptr.dtype.element_ty)
            d = tl.where(m, v.to(tl.float32) - k[None, :], 0.0)   # masked pixels out of the sums
            if TILE_SUM:
                s1 += tl.sum(d, axis=0)
                s2 += tl.sum(d * d, axis=0)
            else:
                acc1 += d
                acc2 += d * d
        if not TILE_SUM:
            s1 = tl.sum(acc1, axis=0)
            s2 = tl.sum(acc2, axis=0)
        cnt = cnt_i.to(tl.float32)
        mean_c = k + s1 / cnt
        m2_c = tl.maximum(s2 - s1 * s1 / cnt, 0.0)
        if GROUPED:
            gi = tl.arange(0, GBP)
            memb = (gi[:, None] == (lane // CG)[None, :]) & cm[None, :]     # [group, lane]
            gmean = tl.sum(tl.where(memb, mean_c[None, :], 0.0), axis=1) / CG
            dm = tl.where(memb, mean_c[None, :] - gmean[:, None], 0.0)
            gm2 = tl.sum(tl.where(memb, m2_c[None, :], 0.0) + cnt * dm * dm, axis=1)
            g = cb * GB + gi
            gm = (gi < GB) & (g < G)
            off = (n * S + s).to(tl.int64) * G + g
            tl.store(mean_ptr + off, gmean, mask=gm)
            tl.store(m2_ptr + off, gm2, mask=gm)
        else:
            off = (n * S + s).to(tl.int64) * C + cols
            tl.store(mean_ptr + off, mean_c, mask=cm)
            tl.store(m2_ptr + off, m2_c, mask=cm)

    @triton.jit
    def _gn_finish(mean_ptr, m2_ptr, stat_ptr, HW, G, eps, S: tl.constexpr, C: tl.constexpr, CG: tl.constexpr,
                   R: tl.constexpr, BS: tl.constexpr, BG: tl.constexpr):
        # Program (n, g): the partials of the group's channels over every range of pixels merged.
        pid = tl.program_id(0)
        n = pid // G
        g = pid % G
        ss = tl.arange(0, BS)
        cc = tl.arange(0, BG)
        tot_mean = 0.0
        tot_m2 = 0.0
        tot_cnt = 0.0
        for s0 in range(0, S, BS):
            sv = s0 + ss
            sm = sv < S
            m = sm[:, None] & (cc < CG)[None, :]
            off = (n * S + sv)[:, None].to(tl.int64) * C + g * CG + cc[None, :]
            mu = tl.load(mean_ptr + off, mask=m, other=0.0)
            q = tl.load(m2_ptr + off, mask=m, other=0.0)
            cnt_s = tl.where(sm, tl.minimum(HW - sv * R, R), 0).to(tl.float32)
            w = tl.where(m, cnt_s[:, None], 0.0)
            nb = tl.sum(tl.sum(w, axis=1), axis=0)
            nbs = tl.maximum(nb, 1.0)
            bmean = tl.sum(tl.sum(w * mu, axis=1), axis=0) / nbs
            dm = tl.where(m, mu - bmean, 0.0)
            bm2 = tl.sum(tl.sum(q + w * dm * dm, axis=1), axis=0)
            tot = tot_cnt + nb
            tots = tl.maximum(tot, 1.0)
            delta = bmean - tot_mean
            tot_mean = tot_mean + delta * (nb / tots)
            tot_m2 = tot_m2 + bm2 + delta * delta * (tot_cnt * nb / tots)
            tot_cnt = tot
        var = tot_m2 / tl.maximum(tot_cnt, 1.0)
        tl.store(stat_ptr + pid * 2, tot_mean)
        tl.store(stat_ptr + pid * 2 + 1, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _gn_apply(x_ptr, t_ptr, t_sn, w_ptr, b_ptr, stat_ptr, m2_ptr, y_ptr, HW, G, CB, eps, S: tl.constexpr,
                  R: tl.constexpr, C: tl.constexpr,
                  CG: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, HAS_T: tl.constexpr, SILU: tl.constexpr,
                  MERGE: tl.constexpr = False, BS: tl.constexpr = 1, GW: tl.constexpr = 1):
        # Program (n, block of BR pixels, block of BC channels): (x [+ t] - mean) · rstd · w + b,
        # rounded to x's dtype, then SiLU of that value in float32, rounded again (the library's
        # norm, then its SiLU). MERGE: the (mean, rstd) of the block's groups merged here from the
        # grouped statistics pass's partials [N, S, G] (means at stat_ptr, sums of squared
        # deviations at m2_ptr; already merged across each group's channels) over the ranges of
        # pixels (Chan), as _gn_finish merges its per-channel partials (one launch fewer); else
        # read from _gn_finish's [N, G, 2] at stat_ptr.
        pid = tl.program_id(0)
        nblk = tl.cdiv(HW, BR)
        cb = pid % CB
        pb = (pid // CB) % nblk
        n = pid // (CB * nblk)
        p = pb * BR + tl.arange(0, BR)
        pm = p < HW
        cols = cb * BC + tl.arange(0, BC)
        cm = cols < C
        m = pm[:, None] & cm[None, :]
        off = n.to(tl.int64) * HW * C + p[:, None].to(tl.int64) * C + cols[None, :]
        v = tl.load(x_ptr + off, mask=m, other=0.0)
        if HAS_T:
            tv = tl.load(t_ptr + n * t_sn + cols, mask=cm, other=0.0).to(tl.float32)
            v = (v.to(tl.float32) + tv[None, :]).to(x_ptr.dtype.element_ty)
        v = v.to(tl.float32)
        if MERGE:
            g_lo = (cb * BC) // CG
            gw = tl.arange(0, GW)
            gg = g_lo + gw
            gmask = gg < G
            ss = tl.arange(0, BS)
            tot_mean = tl.zeros((GW,), dtype=tl.float32)
            tot_m2 = tl.zeros((GW,), dtype=tl.float32)
            tot_cnt = 0.0
            for s0 in range(0, S, BS):
                sv = s0 + ss
                sm = sv < S
                mm = sm[:, None] & gmask[None, :]
                soff = (n * S + sv)[:, None].to(tl.int64) * G + gg[None, :]
                gmu = tl.load(stat_ptr + soff, mask=mm, other=0.0)
                gq = tl.load(m2_ptr + soff, mask=mm, other=0.0)
                cnt_s = tl.where(sm, tl.minimum(HW - sv * R, R), 0).to(tl.float32) * CG
                nb = tl.sum(cnt_s, axis=0)
                bmean = tl.sum(cnt_s[:, None] * gmu, axis=0) / tl.maximum(nb, 1.0)
                dm = tl.where(mm, gmu - bmean[None, :], 0.0)
                bm2 = tl.sum(gq + cnt_s[:, None] * dm * dm, axis=0)
                tot = tot_cnt + nb
                tots = tl.maximum(tot, 1.0)
                delta = bmean - tot_mean
                tot_mean = tot_mean + delta * (nb / tots)
                tot_m2 = tot_m2 + bm2 + delta * delta * (tot_cnt * nb / tots)
                tot_cnt = tot
            rs_g = 1.0 / tl.sqrt(tot_m2 / tl.maximum(tot_cnt, 1.0) + eps)
            memb = ((cols // CG - g_lo)[:, None] == gw[None, :])
            mu = tl.sum(tl.where(memb, tot_mean[None, :], 0.0), axis=1)
            rs = tl.sum(tl.where(memb, rs_g[None, :], 0.0), axis=1)
        else:
            grp = n * G + cols // CG
            mu = tl.load(stat_ptr + grp * 2, mask=cm, other=0.0)
            rs = tl.load(stat_ptr + grp * 2 + 1, mask=cm, other=0.0)
        wv = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        y = ((v - mu[None, :]) * rs[None, :]) * wv[None, :] + bv[None, :]
        if SILU:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gn_single(x_ptr, t_ptr, t_sn, w_ptr, b_ptr, y_ptr, G, eps, HW: tl.constexpr, C: tl.constexpr,
                   CG: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr, HAS_T: tl.constexpr,
                   SILU: tl.constexpr):
        # Program (n, g): the group's statistics and its normalizing pass in one launch, for
        # activations too small to fill the card three launches over. Per channel of the group,
        # values shifted by its first pixel and summed with their squares over all pixels; the
        # channels' means and sums of squared deviations merged (Chan), then a second pass over the
        # group's pixels (from the L2 cache) with the normalizing pass's arithmetic.
        pid = tl.program_id(0)
        n = pid // G
        g = pid % G
        rows = tl.arange(0, BR)
        cc = tl.arange(0, BG)
        cm = cc < CG
        cols = g * CG + cc
        base = n.to(tl.int64) * HW * C
        if HAS_T:
            tv = tl.load(t_ptr + n * t_sn + cols, mask=cm, other=0.0).to(tl.float32)
        k = tl.load(x_ptr + base + cols, mask=cm, other=0.0)
        if HAS_T:
            k = (k.to(tl.float32) + tv).to(x_ptr.dtype.element_ty)
        k = k.to(tl.float32)
        acc1 = tl.zeros((BR, BG), dtype=tl.float32)
        acc2 = tl.zeros((BR, BG), dtype=tl.float32)
        for r0 in range(0, HW, BR):
            p = r0 + rows
            m = (p < HW)[:, None] & cm[None, :]
            v = tl.load(x_ptr + base + p[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0)
            if HAS_T:
                v = (v.to(tl.float32) + tv[None, :]).to(x_ptr.dtype.element_ty)
            d = tl.where(m, v.to(tl.float32) - k[None, :], 0.0)
            acc1 += d
            acc2 += d * d
        s1 = tl.sum(acc1, axis=0)
        s2 = tl.sum(acc2, axis=0)
        mean_c = k + s1 / HW
        m2_c = tl.maximum(s2 - s1 * s1 / HW, 0.0)
        mu = tl.sum(tl.where(cm, mean_c, 0.0), axis=0) / CG
        dm = tl.where(cm, mean_c - mu, 0.0)
        m2 = tl.sum(tl.where(cm, m2_c, 0.0), axis=0) + HW * tl.sum(dm * dm, axis=0)
        rs = 1.0 / tl.sqrt(m2 / (HW * CG) + eps)
        wv = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        for r0 in range(0, HW, BR):
            p = r0 + rows
            m = (p < HW)[:, None] & cm[None, :]
            off = base + p[:, None].to(tl.int64) * C + cols[None, :]
            v = tl.load(x_ptr + off, mask=m, other=0.0)
            if HAS_T:
                v = (v.to(tl.float32) + tv[None, :]).to(x_ptr.dtype.element_ty)
            y = ((v.to(tl.float32) - mu) * rs) * wv[None, :] + bv[None, :]
            if SILU:
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)

    return _gn_partial, _gn_finish, _gn_apply, _gn_single


def _is_channels_last(x: Any) -> bool:
    import torch

    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _programs_target(device: Any, per_sm: int = 2) -> int:
    """``per_sm`` programs per multiprocessor on a GPU; 4 in triton's CPU interpreter."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        from .hidden_attn_cuda import persist_blocks

        return per_sm * persist_blocks(device)
    return 4


def _rows_per_program(blocks: int, hw: int, target: int, br: int) -> int:
    """Pixels per statistics program (``blocks`` programs per range of pixels): a power of two ≥
    ``br`` giving ≥ ``target`` programs where the tensor allows it, at most 1,024, and no longer than
    the ``hw`` pixels need (a range past them would loop over nothing)."""
    r = br
    while r < 1024 and r < hw and blocks * -(-hw // (2 * r)) >= target:
        r *= 2
    return r


# The launch settings (docs/performance.md, runs 75-76: the fastest of those timed): the normalizing
# pass in tiles of 64 pixels × 64 channels by 4 warps; the statistics pass in tiles of STAT_ROWS
# pixels by STAT_WARPS warps, summed per lane (STAT_TILE_SUM True: across each tile's rows as it
# arrives), STAT_PROGRAMS programs per multiprocessor at least where the tensor allows it.
STAT_ROWS, STAT_WARPS, STAT_TILE_SUM, STAT_PROGRAMS = 64, 4, False, 2

# Activations of at most SINGLE_MAX_PIXELS pixels and SINGLE_MAX_ELEMENTS elements take the
# one-kernel form (a program per sample and group: statistics and the normalizing pass in one
# launch) instead of the three kernels, in tiles of SINGLE_TILE elements (the group's channels
# padded to a power of two × pixels) by SINGLE_WARPS warps. Measured per norm of SD's UNet on an
# H200 (docs/performance.md, run 85): at one image the 30 calls at 16² and 8² take 147 µs per
# evaluation against 209 in three kernels; at 32² and at 32 images (2,048 programs of up to 4,096
# pixels) the three kernels are faster.
SINGLE_MAX_PIXELS, SINGLE_MAX_ELEMENTS, SINGLE_TILE, SINGLE_WARPS = 256, 1 << 21, 4096, 8

# Other activations of at most MERGE_MAX_ELEMENTS elements take two kernels instead of three: the
# statistics pass per range of pixels and whole group, merged by each normalizing program for its
# own few groups (the merge kernel's launch gone; each program reads S partials of its groups).
# Larger ones keep the merge kernel, where the partials every normalizing program would read add up
# (SD's UNet at 32 images: 20,480 programs).
MERGE_MAX_ELEMENTS = 1 << 23


def group_norm_act_triton(x: Any, t: Any, w: Any, b: Any, groups: int, eps: float, silu: bool,
                          *, block_rows: int = 64, block_c: int = 64, warps: int = 4,
                          stat_rows: int | None = None, stat_warps: int | None = None,
                          stat_tile_sum: bool | None = None, stat_programs: int | None = None,
                          single: bool | None = None, single_tile: int | None = None,
                          single_warps: int | None = None, merge: bool | None = None) -> Any:
    """GroupNorm of ``x (+ t[:, :, None, None])`` with weight ``w`` and bias ``b`` (then SiLU when
    ``silu``) by the Triton kernels: x [N, C, H, W] channels-last, t [N, C] or None, C divisible by
    ``groups``. The output has x's layout. Three kernels (statistics per range of pixels, their
    merge, the normalizing pass): ``block_rows`` × ``block_c`` by ``warps`` is the normalizing
    pass's tile; the ``stat_*`` settings (default: the module's ``STAT_*``) the statistics pass's
    (same ``block_c``; in the two-kernel form whole groups in ``_group_lanes(C // groups, block_c)``
    lanes). Or (``single``; default: at most ``SINGLE_MAX_PIXELS`` pixels and
    ``SINGLE_MAX_ELEMENTS`` elements) one kernel, a program per sample and group, in tiles of
    ``single_tile`` elements by ``single_warps`` warps (default ``SINGLE_TILE``, ``SINGLE_WARPS``).
    ``merge`` (default: at most ``MERGE_MAX_ELEMENTS`` elements): of the three kernels, two — the
    statistics per range and whole group, merged by the normalizing pass."""
    import torch
    import triton

    stat_rows = STAT_ROWS if stat_rows is None else int(stat_rows)
    stat_warps = STAT_WARPS if stat_warps is None else int(stat_warps)
    stat_tile_sum = STAT_TILE_SUM if stat_tile_sum is None else bool(stat_tile_sum)
    stat_programs = STAT_PROGRAMS if stat_programs is None else int(stat_programs)
    single_tile = SINGLE_TILE if single_tile is None else int(single_tile)
    single_warps = SINGLE_WARPS if single_warps is None else int(single_warps)
    if not _is_channels_last(x):
        raise ValueError(f"group_norm_act: x must be a channels-last [N, C, H, W] tensor, got shape "
                         f"{tuple(x.shape)} strides {tuple(x.stride())}")
    N, C, H, W = (int(s) for s in x.shape)
    if groups < 1 or C % groups:
        raise ValueError(f"group_norm_act: {C} channels do not split into {groups} groups")
    if tuple(w.shape) != (C,) or tuple(b.shape) != (C,):
        raise ValueError(f"group_norm_act: w and b must be [{C}], got {tuple(w.shape)} and {tuple(b.shape)}")
    if t is not None and (tuple(t.shape) != (N, C) or t.dtype != x.dtype):
        raise ValueError(f"group_norm_act: t must be [{N}, {C}] of {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    for name, v in (("block_rows", block_rows), ("block_c", block_c), ("stat_rows", stat_rows),
                    ("warps", warps), ("stat_warps", stat_warps), ("single_tile", single_tile),
                    ("single_warps", single_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"group_norm_act: {name} must be a power of two, got {v}")
    if stat_programs < 1:
        raise ValueError(f"group_norm_act: stat_programs must be at least 1, got {stat_programs}")
    HW = H * W
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    CG = C // groups
    bg = triton.next_power_of_2(CG)
    if single is None:   # by size; a group wider than the tile keeps the three kernels
        single = HW <= SINGLE_MAX_PIXELS and x.numel() <= SINGLE_MAX_ELEMENTS and bg <= single_tile
    # t read in place where its channels are contiguous (a time-table row expanded over the batch
    # has a sample stride of 0); x is a placeholder pointer where there is no t
    if t is None:
        tt, t_sn = x, 0
    elif t.stride(1) == 1:
        tt, t_sn = t, int(t.stride(0))
    else:
        tt, t_sn = t.contiguous(), C
    w, b = w.contiguous(), b.contiguous()
    partial, finish, apply, one = _kernels()
    from .encoder_fast import _on_device

    if single:
        with _on_device(x.device):
            one[(N * groups,)](x, tt, t_sn, w, b, y, groups, float(eps), HW=HW, C=C, CG=CG,
                               BR=max(1, single_tile // bg),
                               BG=bg, HAS_T=t is not None, SILU=bool(silu), num_warps=single_warps)
        return y
    if merge is None:   # by size: where the launches, not the bytes, cost the time
        merge = x.numel() <= MERGE_MAX_ELEMENTS
    CB = triton.cdiv(C, block_c)
    dev = x.device
    grid_apply = (N * triton.cdiv(HW, block_rows) * CB,)
    if merge:
        # the statistics pass per range and group (whole groups per program), merged by the
        # normalizing pass itself: two launches
        lanes = _group_lanes(CG, block_c)
        GB = lanes // CG
        CBg = triton.cdiv(groups, GB)
        R = _rows_per_program(N * CBg, HW, _programs_target(dev, stat_programs), stat_rows)
        S = triton.cdiv(HW, R)
        part_mean = torch.empty((N, S, groups), dtype=torch.float32, device=dev)
        part_m2 = torch.empty((N, S, groups), dtype=torch.float32, device=dev)
        with _on_device(dev):
            partial[(N * S * CBg,)](x, tt, t_sn, part_mean, part_m2, HW, S, CBg, groups, C=C, R=R, BR=stat_rows,
                                    BC=lanes, HAS_T=t is not None, TILE_SUM=stat_tile_sum, GROUPED=True, CG=CG,
                                    GB=GB, GBP=triton.next_power_of_2(GB), num_warps=stat_warps)
            apply[grid_apply](x, tt, t_sn, w, b, part_mean, part_m2, y, HW, groups, CB, float(eps), S=S, R=R, C=C, CG=CG,
                              BR=block_rows, BC=block_c, HAS_T=t is not None, SILU=bool(silu), MERGE=True,
                              BS=min(64, triton.next_power_of_2(S)),
                              GW=triton.next_power_of_2(min(groups, block_c // CG + 2)), num_warps=warps)
        return y
    R = _rows_per_program(N * CB, HW, _programs_target(dev, stat_programs), stat_rows)
    S = triton.cdiv(HW, R)
    part_mean = torch.empty((N, S, C), dtype=torch.float32, device=dev)
    part_m2 = torch.empty((N, S, C), dtype=torch.float32, device=dev)
    stats = torch.empty((N, groups, 2), dtype=torch.float32, device=dev)
    with _on_device(dev):
        partial[(N * S * CB,)](x, tt, t_sn, part_mean, part_m2, HW, S, CB, groups, C=C, R=R, BR=stat_rows,
                               BC=block_c, HAS_T=t is not None, TILE_SUM=stat_tile_sum, num_warps=stat_warps)
        finish[(N * groups,)](part_mean, part_m2, stats, HW, groups, float(eps), S=S, C=C, CG=CG, R=R,
                              BS=min(64, triton.next_power_of_2(S)), BG=triton.next_power_of_2(CG),
                              num_warps=1)
        apply[grid_apply](x, tt, t_sn, w, b, stats, stats, y, HW, groups, CB, float(eps), S=1, R=1, C=C, CG=CG,
                          BR=block_rows, BC=block_c, HAS_T=t is not None, SILU=bool(silu), num_warps=warps)
    return y


def _group_lanes(cg: int, block_c: int) -> int:
    """Lanes of a grouped statistics program: the least power of two ≥ ``block_c`` (at most four
    times it) in which whole groups of ``cg`` channels fill at least three quarters; a group wider
    than that, its own power of two."""
    lanes = block_c
    while lanes < 4 * block_c and (lanes // cg) * cg * 4 < lanes * 3:
        lanes *= 2
    return max(lanes, 1 << (cg - 1).bit_length())


def group_norm_act_reference(x: Any, t: Any, w: Any, b: Any, groups: int, eps: float, silu: bool) -> Any:
    """The library's ops for :func:`group_norm_act` (diffusers' own code)."""
    import torch.nn.functional as F

    h = x if t is None else x + t[:, :, None, None]
    y = F.group_norm(h, int(groups), w, b, float(eps))
    return F.silu(y) if silu else y


@functools.cache
def _op() -> Any:
    """GroupNorm (+ SiLU) as a custom operator (opaque to ``torch.compile``, which keeps the rest of
    the UNet compiled around it); the library's ops where the Triton kernels cannot run."""
    import torch

    from .whisper_fast import triton_available

    @torch.library.custom_op("mi300x_cert::group_norm_act", mutates_args=(),
                             schema="(Tensor x, Tensor? t, Tensor w, Tensor b, int groups, float eps, "
                                    "bool silu) -> Tensor")
    def _impl(x: torch.Tensor, t: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor, groups: int,
              eps: float, silu: bool) -> torch.Tensor:
        if (x.is_cuda and _is_channels_last(x) and (t is None or t.dtype == x.dtype)
                and triton_available(str(x.device))):
            return group_norm_act_triton(x, t, w, b, groups, eps, silu)
        return torch.empty_like(x).copy_(group_norm_act_reference(x, t, w, b, groups, eps, silu))

    @_impl.register_fake
    def _(x: torch.Tensor, t: torch.Tensor | None, w: torch.Tensor, b: torch.Tensor, groups: int,
          eps: float, silu: bool) -> torch.Tensor:
        return torch.empty_like(x)

    return _impl


def group_norm_act(x: Any, t: Any, w: Any, b: Any, groups: int, eps: float, silu: bool) -> Any:
    """GroupNorm(x + t) (+ SiLU) as the operator: the Triton kernels on a GPU for channels-last
    activations, else the library."""
    _op()
    import torch

    return torch.ops.mi300x_cert.group_norm_act(x, t, w, b, int(groups), float(eps), bool(silu))


# Activations smaller than this keep the library's ops (compiled, Inductor fuses them with their
# neighbours). 0: every size. Set at 2²³ while each statistics program covered 1,024 pixels whatever
# the activation had (at one image the kernels then cost more than they saved, run 69); since the
# ranges fit the activation, the kernels at every size are faster at one image too (run 81: UNet
# batch 2, 5.90 against 6.11 ms per evaluation replayed as a graph; docs/performance.md).
KERNEL_MIN_ELEMENTS = 0
# The rule where the model is called from the host each step instead of replayed as a device graph
# (schedulers the loop cannot be captured with, graphs turned off): there each launch costs the
# host's time, and at one image the kernels' launches took 47.1 ms per evaluation against the
# library's 12.3 (run 81), so small activations keep the library's ops.
EAGER_KERNEL_MIN_ELEMENTS = 1 << 23


def kernel_rule(min_elements: int | None = None) -> int:
    """The size rule in force: ``min_elements`` where a model was given its own, else
    ``KERNEL_MIN_ELEMENTS`` as it is now."""
    return KERNEL_MIN_ELEMENTS if min_elements is None else int(min_elements)


def takes_kernels(numel: int, min_elements: int | None = None) -> bool:
    """Whether an activation of ``numel`` elements goes to the kernels under the rule (:func:`kernel_rule`)."""
    return numel >= kernel_rule(min_elements)


def _gn(x: Any, t: Any, w: Any, b: Any, groups: int, eps: float, silu: bool, min_elements: int | None = None) -> Any:
    """The registered operator for activations that take the kernels (:func:`takes_kernels`;
    registered before any tracing: torch.compile would trace the registration itself), else the
    library's ops."""
    import torch

    if x.dim() != 4 or not takes_kernels(x.numel(), min_elements):
        return group_norm_act_reference(x, t, w, b, groups, eps, silu)
    return torch.ops.mi300x_cert.group_norm_act(x, t, w, b, int(groups), float(eps), bool(silu))


# -- the modules ---------------------------------------------------------------------------------

@functools.cache
def _module_class() -> Any:
    import torch

    class GroupNormAct(torch.nn.Module):
        """A ``GroupNorm`` module (its own weights) computed by :func:`group_norm_act`, with the SiLU
        after it when ``silu``; inputs that are not 4-D or below the size rule (``min_elements``,
        default ``KERNEL_MIN_ELEMENTS``) go to the library's ops."""

        def __init__(self, norm: Any, silu: bool, min_elements: int | None = None) -> None:
            super().__init__()
            _op()
            self.norm = norm
            self.silu = bool(silu)
            self.min_elements = min_elements

        def forward(self, x: Any) -> Any:
            n = self.norm
            return _gn(x, None, n.weight, n.bias, n.num_groups, n.eps, self.silu, self.min_elements)

    return GroupNormAct


def GroupNormAct(norm: Any, silu: bool, min_elements: int | None = None) -> Any:  # noqa: N802 - lazy class (torch)
    """A module computing ``norm`` (a ``GroupNorm``) and then SiLU when ``silu``, by :func:`group_norm_act`
    from ``min_elements`` elements on (default ``KERNEL_MIN_ELEMENTS``)."""
    return _module_class()(norm, silu, min_elements)


def _conv_out_numel(conv: Any, x: Any) -> int | None:
    """Elements of ``conv(x)`` for a 2-D convolution with numeric padding; None for a padding given
    as a string (such a convolution is left as it is)."""
    if isinstance(conv.padding, str):
        return None
    n = int(x.shape[0]) * int(conv.out_channels)
    for size, k, s, p, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        n *= max(0, (int(size) + 2 * p - d * (k - 1) - 1) // s + 1)
    return n


def _resnet_forward(block: Any, input_tensor: Any, temb: Any, *args: Any, **kwargs: Any) -> Any:
    """``ResnetBlock2D.forward`` (eval, default time-embedding norm or ``group`` without a time
    projection, no resampling) with each norm → SiLU, and the time embedding's add before the
    second, as one :func:`group_norm_act`."""
    if block.time_emb_proj is None and temb is not None and block.time_embedding_norm == "default":
        # diffusers adds such a temb as it is: its own forward
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    import torch

    rule = getattr(block, "_gn_min_elements", None)
    n1, n2 = block.norm1, block.norm2
    x = _gn(input_tensor, None, n1.weight, n1.bias, n1.num_groups, n1.eps, True, rule)
    t = None
    cols = getattr(block, "_time_cols", None)
    from_table = cols is not None and temb is not None and temb.dim() == 2 and int(temb.shape[-1]) == cols[2]
    if from_table:
        t = temb[:, cols[0]:cols[0] + cols[1]]   # a row of the time table: this resnet's term, ready
    elif block.time_emb_proj is not None and temb is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        t = block.time_emb_proj(temb)
    c1 = block.conv1
    out_numel = _conv_out_numel(c1, x) if type(c1) is torch.nn.Conv2d and x.dim() == 4 else None
    if (torch.compiler.is_compiling() and c1.bias is not None and out_numel is not None
            and takes_kernels(out_numel, rule)):
        # Compiled, Inductor runs the convolution without its bias and adds the bias in a kernel
        # of its own that it fuses into what reads the result; the operator cannot take part in
        # that fusion, so that add would be one more pass over the activation. The bias goes into
        # the operator's per-channel add with the time embedding instead (the output's size sends
        # this norm to the kernels; elsewhere the convolution is diffusers' own).
        x = c1._conv_forward(x, c1.weight, None)
        if from_table and cols[3] is not None:   # the table's columns with the bias added: a view, no work
            t = temb[:, cols[3]:cols[3] + cols[1]]
        else:
            bias = c1.bias.float()[None, :]
            t = (bias if t is None else t.float() + bias).expand(int(x.shape[0]), -1).to(x.dtype).contiguous()
    else:
        x = c1(x)
    x = _gn(x, t, n2.weight, n2.bias, n2.num_groups, n2.eps, True, rule)
    x = block.dropout(x)
    x = block.conv2(x)
    sc = block.conv_shortcut(input_tensor) if block.conv_shortcut is not None else input_tensor
    return (sc + x) / block.output_scale_factor


# -- the time table ------------------------------------------------------------------------------

def _get_time_embed(unet: Any, sample: Any, timestep: Any) -> Any:
    """``UNet2DConditionModel.get_time_embed``, passing a batch of time-table rows through."""
    import torch

    width = getattr(unet.time_embedding, "_time_rows_width", None)
    if torch.is_tensor(timestep) and timestep.dim() == 2 and int(timestep.shape[-1]) == width:
        if int(timestep.shape[0]) != int(sample.shape[0]):
            raise ValueError(f"time-table rows for {int(timestep.shape[0])} samples, "
                             f"the UNet has {int(sample.shape[0])}")
        return timestep
    return type(unet).get_time_embed(unet, sample=sample, timestep=timestep)


def _time_embedding_forward(te: Any, sample: Any, condition: Any = None) -> Any:
    """``TimestepEmbedding.forward``; time-table rows are already past it."""
    if sample.dim() == 2 and int(sample.shape[-1]) == te._time_rows_width != int(te.linear_1.in_features):
        return sample
    return type(te).forward(te, sample, condition)


def _is_fast_resnet(m: Any) -> bool:
    return getattr(getattr(m, "forward", None), "__func__", None) is _resnet_forward


def _time_takers(unet: Any) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in unet.named_modules() if hasattr(m, "time_emb_proj")]


def time_table_refusal(unet: Any) -> str | None:
    """Why :func:`time_table` would leave ``unet`` as it is, or ``None`` where it makes the table."""
    if type(unet).__name__ != "UNet2DConditionModel" or not hasattr(unet, "time_embedding"):
        return f"not a UNet2DConditionModel ({type(unet).__name__})"
    for attr, what in (("class_embedding", "a class embedding"), ("add_embedding", "an added embedding"),
                       ("time_embed_act", "an activation after its time embedding")):
        if getattr(unet, attr, None) is not None:
            return f"the UNet has {what}"
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        return "the UNet takes a timestep condition"
    takers = _time_takers(unet)
    if not takers:
        return "no module of the UNet takes the time embedding"
    for name, m in takers:
        if not _is_fast_resnet(m):
            return f"{name} takes the time embedding and is not a resnet of the fast form"
        if m.time_emb_proj is None or getattr(m, "time_embedding_norm", "default") != "default":
            return f"{name} has no time projection or another time-embedding norm"
    width = sum(int(m.time_emb_proj.out_features) * (1 + (m.conv1.bias is not None)) for _, m in takers)
    te = unet.time_embedding
    if width in (int(te.linear_1.in_features), int(te.linear_2.out_features)):
        # a row is told from a timestep's embedding by its width
        return f"the table's width ({width}) is a time embedding's"
    return None


def time_table(unet: Any, timesteps: Any) -> Any:
    """The time embedding of a whole denoising plan, computed once (``fast`` form of a
    ``UNet2DConditionModel``). Every resnet's time term — ``time_emb_proj(SiLU(time_embedding(
    time_proj(t))))`` — depends on the timestep alone, so for the plan's ``timesteps`` it is computed
    here, each resnet's side by side in one row per timestep (in the UNet's dtype, on its device),
    and again with the resnet's first convolution's bias added (float32, rounded once), as the
    compiled resnet adds it where it folds that bias into its norm. Called with such a row
    (expanded to its batch) in place of the timestep, the UNet passes it through its time embedding
    and each resnet reads its own columns: the two products of the time embedding and one product
    per resnet (with their SiLUs) leave every evaluation. Called with a timestep, the UNet computes
    as before.

    Returns the rows [len(timesteps), width], or ``None`` (the UNet unchanged) where
    :func:`time_table_refusal` gives a reason (another module takes the time embedding: class or
    added embeddings, a time activation, a resnet not in the ``fast`` form or without a time
    projection; or the rows' width is a time embedding's, so a row could not be told from one)."""
    import torch

    if time_table_refusal(unet) is not None:
        return None
    takers = [m for _, m in _time_takers(unet)]
    param = next(unet.parameters())
    with torch.inference_mode():
        ts = torch.as_tensor(timesteps).to(param.device)
        probe = torch.empty((int(ts.shape[0]), 1), device=param.device, dtype=unet.dtype)
        emb = type(unet.time_embedding).forward(unet.time_embedding,
                                                type(unet).get_time_embed(unet, sample=probe, timestep=ts))
        terms = [m.time_emb_proj(emb if m.skip_time_act else m.nonlinearity(emb)) for m in takers]
        # with the first convolution's bias added as the compiled resnet folds it (float32, rounded
        # once), for where the fold applies
        folded = [None if m.conv1.bias is None else (term.float() + m.conv1.bias.float()[None, :]).to(term.dtype)
                  for m, term in zip(takers, terms)]
        rows = torch.cat([*terms, *(f for f in folded if f is not None)], dim=1).contiguous()
    width, off = int(rows.shape[1]), 0
    offsets = []
    for term in terms:
        offsets.append(off)
        off += int(term.shape[1])
    for m, term, f, start in zip(takers, terms, folded, offsets):
        m._time_cols = (start, int(term.shape[1]), width, None if f is None else off)
        off += 0 if f is None else int(f.shape[1])
    unet.time_embedding._time_rows_width = width
    unet.time_embedding.forward = types.MethodType(_time_embedding_forward, unet.time_embedding)
    unet.get_time_embed = types.MethodType(_get_time_embed, unet)
    return rows


# -- the cross-attention K/V table ---------------------------------------------------------------

# the blocks of SD's UNet: no module of theirs but the transformers' cross-attentions takes the
# encoder states (at the UNet's own level, an added text embedding and an encoder projection do:
# refused by kv_table_refusal)
_KV_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D")


def _kv_forward(lin: Any, x: Any) -> Any:
    """A cross-attention's fused K/V projection (``Attention.to_kv``); a K/V table's rows are past
    it already: its own columns of them."""
    off, out, width = lin._kv_cols
    if int(x.shape[-1]) == width != int(lin.in_features):
        return x[..., off:off + out]
    return type(lin).forward(lin, x)


def _kv_takers(unet: Any) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in unet.named_modules()
            if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)]


def kv_table_refusal(unet: Any) -> str | None:
    """Why :func:`kv_table` would leave ``unet`` as it is, or ``None`` where it takes the table."""
    import torch

    if type(unet).__name__ != "UNet2DConditionModel":
        return f"not a UNet2DConditionModel ({type(unet).__name__})"
    if getattr(unet, "encoder_hid_proj", None) is not None:
        return "the UNet projects its encoder states"
    if unet.config.get("addition_embed_type") in ("text", "text_image"):
        return "the UNet's added embedding reads its encoder states"
    blocks = [*(("down_blocks", b) for b in unet.down_blocks), ("mid_block", unet.mid_block),
              *(("up_blocks", b) for b in unet.up_blocks)]
    for where, b in blocks:
        if b is not None and type(b).__name__ not in _KV_BLOCKS:
            return f"a block of {where} is a {type(b).__name__}, not one of SD's"
    for name, m in unet.named_modules():
        if getattr(m, "caption_projection", None) is not None:
            return f"{name} projects its encoder states"
    takers = _kv_takers(unet)
    if not takers:
        return "no module of the UNet attends to the encoder states"
    for name, m in takers:
        proc = type(getattr(m, "processor", None)).__name__
        if proc != "FusedAttnProcessor2_0":
            return f"{name} runs {proc}, not the fused projections' processor"
        if getattr(m, "to_kv", None) is None:
            return f"{name} has no fused K/V projection"
        if type(m.to_kv) is not torch.nn.Linear:   # e.g. a LoRA wrapper, whose scale may change per call
            return f"{name}'s K/V projection is a {type(m.to_kv).__name__}, not a Linear"
        # (SD's blocks give their cross-attentions no norm of the encoder states; kept as a guard)
        if getattr(m, "norm_cross", None) or getattr(m, "added_kv_proj_dim", None) is not None:
            return f"{name} normalizes or adds to its encoder states"
    width = sum(int(m.to_kv.out_features) for _, m in takers)
    if width in {int(m.to_kv.in_features) for _, m in takers}:
        # a table's row is told from an encoder state by its width
        return f"the table's width ({width}) is an encoder state's"
    return None


def kv_table(unet: Any) -> list[Any] | None:
    """The keys and values of every cross-attention of ``unet``, computed once per batch of encoder
    states (SD's text embeddings do not change over the denoising loop): each cross-attention's
    fused K/V projection (``to_kv``; fused projections and diffusers' ``FusedAttnProcessor2_0``)
    is set to take its own columns of a K/V table's rows where it is handed them in place of the
    encoder states, and computes its product as before where it is handed encoder states. Returns
    the projections in the table's column order (:func:`kv_rows` makes the table), or ``None`` (the
    UNet unchanged) where :func:`kv_table_refusal` gives a reason (another module takes the encoder
    states: an encoder projection, an added text embedding, a block other than SD's; a processor
    other than the fused one; no fused projection, or one that is not a plain ``Linear``; or the
    table as wide as an encoder state, so a table could not be told from one)."""
    if kv_table_refusal(unet) is not None:
        return None
    layers = [m.to_kv for _, m in _kv_takers(unet)]
    width = sum(int(lin.out_features) for lin in layers)
    off = 0
    for lin in layers:
        lin._kv_cols = (off, int(lin.out_features), width)
        lin.forward = types.MethodType(_kv_forward, lin)
        off += int(lin.out_features)
    return layers


def kv_rows(layers: list[Any], states: Any) -> Any:
    """The K/V table of ``states`` [N, tokens, dim] for the projections :func:`kv_table` returned:
    [N, tokens, Σ their widths], each cross-attention's keys and values side by side (its own
    product, as it computes it)."""
    import torch

    return torch.cat([type(lin).forward(lin, states) for lin in layers], dim=-1)


def _upsample_forward(up: Any, hidden_states: Any, output_size: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``Upsample2D.forward`` (interpolation, no norm, no transposed convolution) without the
    channels-first copy diffusers makes at a batch of 64 or more, where it is being compiled (run
    eagerly, diffusers' own forward with its copies, which avoid the eager NHWC kernel's faults)."""
    import torch
    import torch.nn.functional as F

    if not torch.compiler.is_compiling():
        return type(up).forward(up, hidden_states, output_size, *args, **kwargs)
    if int(hidden_states.shape[1]) != int(up.channels):
        raise ValueError(f"Upsample2D: {up.channels} channels expected, got {int(hidden_states.shape[1])}")
    if output_size is None:
        hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
    else:
        hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    if up.use_conv:
        conv = up.conv if up.name == "conv" else up.Conv2d_0
        hidden_states = conv(hidden_states)
    return hidden_states


def _resnet_ok(m: Any) -> bool:
    import torch

    # diffusers' "group" time norm (the VAE decoder's up blocks) has no time projection and computes
    # norm2 alone: the default path without a time embedding
    norm = getattr(m, "time_embedding_norm", "default")
    return (type(m).__name__ == "ResnetBlock2D" and m.upsample is None and m.downsample is None
            and (norm == "default" or (norm == "group" and m.time_emb_proj is None))
            and isinstance(m.nonlinearity, torch.nn.SiLU)
            and all(isinstance(n, torch.nn.GroupNorm) and n.affine for n in (m.norm1, m.norm2)))


def _upsample_ok(m: Any) -> bool:
    return (type(m).__name__ == "Upsample2D" and m.norm is None and not m.use_conv_transpose
            and getattr(m, "interpolate", True))


def prepare_unet(module: Any, form: str, *, min_elements: int | None = None) -> dict[str, int]:
    """Set ``module``'s (a UNet's or a VAE's) submodules to run in ``form`` (one of ``UNET_FORMS``);
    returns how many modules of each kind it changed. ``library`` changes nothing. The module must be
    in eval mode (the resnets' dropout is left out). ``min_elements``: the size rule of its norms
    (default: ``KERNEL_MIN_ELEMENTS`` as it is when they run; ``EAGER_KERNEL_MIN_ELEMENTS`` for a
    model called from the host each step rather than replayed as a device graph)."""
    import torch

    if form not in UNET_FORMS:
        raise ValueError(f"UNet form must be one of {UNET_FORMS}, got {form!r}")
    if min_elements is not None and (isinstance(min_elements, bool) or not isinstance(min_elements, int)
                                     or min_elements < 0):
        raise ValueError(f"prepare_unet: min_elements must be a whole number ≥ 0 or None, got {min_elements!r}")
    counts = {"upsample": 0, "resnet": 0, "norm": 0}
    if form == "library":
        return counts
    if module.training:
        raise ValueError("prepare_unet: the module must be in eval mode")
    if form == "fast":
        _op()  # registered here, not while torch.compile traces the modules
    for m in list(module.modules()):
        if _upsample_ok(m):
            m.forward = types.MethodType(_upsample_forward, m)
            counts["upsample"] += 1
        elif form == "fast" and _resnet_ok(m):
            m.forward = types.MethodType(_resnet_forward, m)
            m._gn_min_elements = min_elements
            counts["resnet"] += 1
    if form == "fast":
        for m in list(module.modules()):
            if type(m).__name__ == "GroupNormAct":   # prepared before: the rule given now
                m.min_elements = min_elements
                continue
            # a transformer's input norm (its only use), and the model's output norm with its SiLU
            if type(m).__name__ == "Transformer2DModel" and isinstance(getattr(m, "norm", None), torch.nn.GroupNorm):
                m.norm = GroupNormAct(m.norm, silu=False, min_elements=min_elements)
                counts["norm"] += 1
            on, act = getattr(m, "conv_norm_out", None), getattr(m, "conv_act", None)
            if isinstance(on, torch.nn.GroupNorm) and isinstance(act, torch.nn.SiLU):
                m.conv_norm_out = GroupNormAct(on, silu=True, min_elements=min_elements)
                m.conv_act = torch.nn.Identity()
                counts["norm"] += 1
    return counts
