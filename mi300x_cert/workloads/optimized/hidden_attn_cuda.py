"""Hidden-form cross-attention as a hand-written CUDA kernel (NVIDIA cards of compute capability
8.0 and later, compiled at run time with NVRTC: no toolkit install, no build step).

Same function as :class:`~.whisper_fast.HiddenAttention` (``out[b, h] = softmax(q'[b, h] · X[b]ᵀ)
X[b]`` over a clip's encoder output X [S, E], all heads of the clip at once), same arguments and
output buffer, so the two are interchangeable candidates timed per batch size on the card.

Why a second kernel: the step of a large Whisper batch is bound by reading X once per layer, and
the Triton kernel holds all heads' [heads × E] accumulators in one program, so the compiler keeps
them in ≈206 KB of shared memory with four warps per SM and reaches under half of an H200's copy
rate. Here the work of a clip is laid out for the matrix units explicitly (one block per clip, or
per clip and split of its rows):

* ``NW`` warps split E into slices of ``EW = E / NW`` columns; each warp keeps its slice of the
  output accumulator ``[EW × heads]`` (float32, heads padded to a multiple of 8) and of q' (as
  matrix-unit fragments, or in shared memory with ``qsmem``) in registers for the whole kernel.
* Loads, two forms. ``bulk`` (compute capability ≥ 9.0, the form chosen on an H200): warp 0 brings
  each tile of ``ROWS`` full rows with one bulk copy per row (``cp.async.bulk``, one lane each) into
  a ``STAGES``-deep ring; a "full" barrier per stage completes when the bytes land, an "empty"
  barrier when every warp is done with the stage, and warp 0 refills it at once. Otherwise each warp
  streams only its own column slice into its own ring with ``cp.async``. Rows are padded by 16
  bytes so ``ldmatrix`` is free of bank conflicts.
* Scores of a tile, ``Sᵀ[rows × heads] = X_tile · q'ᵀ``: each warp multiplies its slice; the warps'
  partial sums meet in shared memory. With ``red2`` they are summed once (each thread a few
  positions) behind a second block barrier; otherwise every warp adds all partials itself (one
  barrier per tile, double-buffered). Every warp then runs the online softmax (float32, running max
  and sum per head) at exactly the positions it needs as the next product's operand.
* ``O'ᵀ[EW × heads] += X_tileᵀ · P``: the same tile, read transposed by ``ldmatrix.trans``, times the
  probabilities packed to fp16 straight from registers.

So every byte of X is read from memory once and feeds both products from shared memory, and the
accumulators never leave registers. ``pipe`` (cp.async form only) computes the scores of the next
tile beside the softmax of the current one. Rows of X can be split over ``splits`` blocks per clip
for parallelism at small batches (partials in the same layout as the Triton kernel's, merged the
same way). ``mode`` 1/2 (bench only) leave out the arithmetic or the loads; 3/4 (persistent form, bench only) copy half of each tile's rows, or copy only the first stages. ``cluster=2`` (bench
only: measured slower, see :data:`CUDA_HIDDEN_CONFIGS`) runs a clip on a cluster of two blocks,
each holding half the columns; each block writes its summed scores of a tile into its own slot of
both blocks' shared memory, and after a cluster barrier both add the slots in rank order.

``persist`` (1 or 2; bulk copies and scores summed once): a persistent grid, one block per
multiprocessor, each walking a contiguous range of the batch's tiles (clip-major), so every block
gets the same number of tiles whatever the batch (no last, partly filled wave) and its ring of
stages runs on across clips (the next clip's first tile lands while the current clip is written
out). A clip cut by a range boundary is finished by whichever of its two blocks ends its part
second: the first writes its part (softmax state and accumulators) to global memory and counts
itself in on the cut's counter (release/acquire), the second merges it and resets the counter. No
block ever waits for another, so progress does not depend on which blocks are resident (a grid
larger than the multiprocessors, a share of them, other kernels beside it). Every tile is a full ``ROWS`` rows (a clip's last tile is its
last rows, the rows already taken masked out). With 2, each clip's output is staged in shared memory
and written as whole rows with 16-byte stores.

``unit_ring`` (bench only: measured slower, see :data:`CUDA_HIDDEN_CONFIGS`; persistent form with
direct stores, 32-row tiles): the ring holds ``stages`` units of 16 rows, a tile two of them wherever
they sit in the ring, so up to ``stages - 2`` units are on their way while a tile is computed; the
room for five units (206 KB at large-v3 shapes) comes from one set of partial scores (summed
between two block barriers, so no warp writes the next tile's before every warp has read this
tile's), kept for the real heads only where the padded ones would not fit (their stores predicated
off, their reads clamped to a real head's row).

``lazy`` (a candidate together with ``last_refills``, see :data:`CUDA_HIDDEN_CONFIGS`): the online
softmax's rescale of the accumulators (a multiply per accumulator, ≈ 120 per thread and tile at
large-v3 shapes, beside ≈ 120 matrix instructions) is skipped in every tile where no head of the warp
moved its running max, and a running max moves only where the tile's passes it by more than
2^:data:`LAZY_LOG2` (as in FlashAttention-4): after a clip's first tiles, a rescale is rare. The
result is the same softmax (the accumulators and the running sum always share one reference max;
the final division cancels it), rounded differently; each probability is one fused multiply-add and
one exp2.

``last_refills`` (persistent form with stages): no "empty" barriers; each warp counts itself done with
a stage in shared memory, and the last one issues the stage's refill at once (all stages are filled
at the start), so warp 0 no longer waits for every other warp before computing its next tile.

``prefetch`` (bench only, persistent form with stages: measured slower) asks the tiles that many
places after the ring's into L2 (``cp.async.bulk.prefetch.L2``, one row a lane) ahead of their bulk
copies.

A kernel that fails to compile, to launch or to match the float32 reference is not chosen; a fault
on the device while a chosen kernel runs fails the run (a CUDA error is sticky for the process).
"""

from __future__ import annotations

from typing import Any

from .whisper_fast import merge_splits, split_buffers

__all__ = ["CudaHiddenAttention", "cuda_hidden_available", "CUDA_HIDDEN_CONFIGS", "cuda_hidden_fits"]

ROWS_CHOICES = (16, 32)  # rows of X per tile: one or two of the matrix units' 16-row tiles
# ``lazy`` (13th configuration element): a head's running max moves only where a tile's max passes it
# by more than this many powers of two, so a probability stays ≤ 2^8 = 256 before it is packed to fp16
# (whose relative precision does not depend on the magnitude, and whose range holds it many times over)
LAZY_LOG2 = 8.0

# (warps, stages, splits, rows, q' in shared memory, pipelined, bulk copies, scores summed once)
# candidates, timed per batch size on the card. Measured on an H200 at Whisper large-v3 shapes
# (bench/hidden_attn_cuda.py, bench/results/h200-run3-hidden-attn-*.json), batch 1024: 32-row tiles,
# bulk copies and scores summed once 3.39 TB/s (79% of the copy rate; the Triton kernel 2.04); the
# same with 16-row tiles 2.91; cp.async loads 2.11 (2.73 with scores summed once); pipelining,
# q' in shared memory, 10 or 16 warps were slower. The cp.async forms are the candidates for
# cards without the bulk-copy engine (compute capability 8.x).
#
# A cluster of two blocks per clip (``cluster=2``: each block half the columns and accumulators, a
# 4-stage ring, the blocks' summed scores exchanged through distributed shared memory behind one
# cluster barrier per tile) is correct (tests/gpu) but measured slower on the H200
# (bench/results/h200-run9-hidden-attn-cluster-push.json, b1024: 1.55 TB/s against 3.38; pulling
# the other block's sums instead of pushing them: 1.10): bench-only, not a candidate.
#
# The persistent form (11th element 1 or 2: a range of the batch's tiles per block, one block per
# multiprocessor, clips cut between blocks handed over through global memory; 2: each clip's output
# staged in shared memory and written with 16-byte stores) measured at b1024
# (bench/results/h200-run15-hidden-attn-persistent.json): 1,128 µs = 3.49 TB/s staged, 1,129 µs
# direct, against 1,154 µs for the per-clip blocks: the last, partly filled wave (1,024 clips on 132
# multiprocessors = 7.76 waves) and the per-block start (stage zeroing, q' latency, first tile) are
# gone. At b64 (one clip per block either way) it is no faster. (A first form in which a block
# waited for the next one's part measured 1,111 µs, run 13, but can hang when not every block is
# resident.)
#
# The unit ring (12th element 1, with persist 1: the ring holds `stages` 16-row units, a tile two of
# them wherever they sit, so up to stages - 2 units are on their way while a tile is computed; five
# units fit beside one set of partial scores kept for the real heads only) is correct (tests/gpu)
# but measured slower (bench/results/h200-run20-hidden-attn-unit-ring.json, b1024: 1,241 µs with five
# units, 1,211 with four, against 1,126 for the persistent form with its two 32-row stages; run 19,
# a first version with branches around the padded heads' stores: 1,298 and 1,295). Four units hold
# the same rows in flight as two stages, so the unit ring itself costs 7%: its per-tile loop has
# ≈ 1,000–1,085 instructions against 863 (two barrier waits and slot arithmetic per tile; with five
# units, the real-heads-only stores and registers spilled in the loop). More rows in flight gained
# nothing. Bench-only, not a candidate.
#
# The lazy rescale (13th element 1: the accumulators' rescale skipped in every tile where no head of
# the warp moved its running max, see the module doc) takes the arithmetic alone from 866 to 804 µs
# per layer at b1024 (diagnostic mode 4), but alone the whole kernel does not follow: 1,140 µs
# against 1,125–1,126 for the persistent staged form, 1,173 against 1,159 per clip
# (bench/results/h200-run23-hidden-attn-lazy.json, h200-run24-hidden-attn-lazy-modes.json): the
# schedulers issue in a third of their cycles and the warps wait at the block barriers and for the
# next tile (Nsight Compute, h200-run27-ncu-*.txt), not on issuing. The last warp's refill (15th
# element 1: each warp counts itself done with a stage in shared memory and the last one refills it,
# instead of warp 0 waiting for all of them before computing its next tile) is no faster alone
# (1,132–1,135 µs) but **with the lazy rescale** it is: **1,112 µs = 3.54 TB/s** in two runs
# (h200-run28-hidden-attn-last-refill.json, h200-run29-hidden-attn-lazy-last.json; sustained for
# 300 calls 1,153 against 1,171), the candidate the chooser picked at b1024 in run 29's Whisper run
# (1,123 µs on the batch's own data). Asking the tiles after the ring's into L2 ahead of their
# copies (14th element: how many tiles ahead; cp.async.bulk.prefetch.L2) is slower: 1,432–1,806 µs
# (h200-run25-hidden-attn-l2-prefetch.json). The lazy rescale alone and the prefetch are bench-only.
CUDA_HIDDEN_CONFIGS: tuple[tuple[int, ...], ...] = (
    (8, 2, 1, 32, 0, 0, 1, 1), (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2), (8, 2, 1, 32, 0, 0, 1, 1, 0, 1, 2, 0, 1, 0, 1),
    (8, 3, 1, 16, 0, 0, 1, 1), (8, 3, 1, 16, 0, 0, 0, 1), (8, 3, 1, 16, 0, 0, 0, 0))


_SOURCE = r"""
#define U (ROWS / 16)
#define EL (E / CL)
#if BULK
// one stage for the whole block: ROWS rows of the block's EL columns of X (each row one bulk copy),
// rows padded by 16 bytes; a warp reads its columns [ec, ec + EW) of each row. UR (the persistent
// form's unit ring): a stage is one 16-row unit, a tile two of them, wherever they sit in the ring
#define PITCH (EL + 8)
#if UR
#define STAGE_HALVES (16 * PITCH)
#else
#define STAGE_HALVES (ROWS * PITCH)
#endif
#define XS_HALVES (STAGES * STAGE_HALVES)
#else
// one ring per warp: ROWS rows of the warp's EW columns, padded by 16 bytes
#define PITCH (EW + 8)
#define STAGE_HALVES (ROWS * PITCH)
#define XS_HALVES (NW * STAGES * STAGE_HALVES)
#endif
#define CPR (EW / 8)
#define CHUNKS (ROWS * CPR)
#define HP (NT * 8)
#define RS (ROWS + 4)
#define QPITCH (EW + 8)
#define KT (EW / 16)
#define MT (EW / 16)
#define LOG2E 1.4426950408889634f
// RHN (defined by the module): heads kept in the partial-score buffers, all NT * 8 (padded) or, where
// the unit ring needs the room, only the HN real ones (the padded heads' scores are zero and never
// written out: their stores are predicated off, their reads clamped to a real row)
#if !UR && RHN != HP
#error "only the unit ring keeps fewer partial-score heads than the padded NT * 8"
#endif
#define RROW(nt) ((RHN % 8 == 0 || (nt) * 8 + 8 <= RHN) ? (nt) * 8 + g : min((nt) * 8 + g, RHN - 1))
#define RFULL(nt) (RHN % 8 == 0 || (nt) * 8 + 8 <= RHN)
// a score store, predicated (no branch, so no divergence) where its head may be a padded one
#define RSTORE(B, I, h, nt, V)                                                                           \
  if (RFULL(nt)) (B)[I] = (V);                                                                           \
  else st_shared_if(&(B)[I], V, (h) < RHN);
// the shared-memory address of row u * 16 + R, column C of the tile at SB: in one ROWS-row stage, or
// (UR) in the two 16-row units SB##_0 and SB##_1 of the ring
#if UR
#define TILE_ADDR(SB, u, R, C) (((u) ? SB##_1 : SB##_0) + ((R) * PITCH + C) * 2)
#else
#define TILE_ADDR(SB, u, R, C) ((SB) + ((u * 16 + R) * PITCH + C) * 2)
#endif
// partial-score buffers (NREDB per-warp sets, TOTN summed sets): see score_buffers() in the module

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned r;
  asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
__device__ __forceinline__ void ldsm4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm2(unsigned& r0, unsigned& r1, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm4t(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned pack_h2(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ unsigned short to_h(float v) {
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ void mbar_init(unsigned addr, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(addr), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned addr, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(addr), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned addr) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(addr) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned addr, unsigned parity) {
  asm volatile("{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}"
               :: "r"(addr), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {  // into L2 only, no completion
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void st_peer(unsigned addr, unsigned rank, float v) {  // into another block's shared memory
  unsigned a;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(addr), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(a), "f"(v) : "memory");
}
__device__ __forceinline__ void st_shared_if(float* p, float v, bool keep) {
  asm volatile("{\n .reg .pred q;\n setp.ne.u32 q, %2, 0;\n @q st.shared.f32 [%0], %1;\n}"
               :: "r"(smem_u32(p)), "f"(v), "r"((unsigned)keep) : "memory");
}
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// partial scores S^T[r][h] of one tile over this warp's columns -> this warp's part of RB
#if QS
#define QLOAD(kt)                                                                                        \
  unsigned qk[NT][2];                                                                                    \
  _Pragma("unroll") for (int nt = 0; nt + 1 < NT; nt += 2)                                               \
    ldsm4(qk[nt][0], qk[nt][1], qk[nt + 1][0], qk[nt + 1][1],                                           \
          qbase + (((nt + (j >> 1)) * 8 + i8) * QPITCH + (kt) * 16 + (j & 1) * 8) * 2);                  \
  if (NT & 1) ldsm2(qk[NT - 1][0], qk[NT - 1][1], qbase + (((NT - 1) * 8 + i8) * QPITCH + (kt) * 16 + (j & 1) * 8) * 2);
#define QF(kt, nt, k) qk[nt][k]
#else
#define QLOAD(kt)
#define QF(kt, nt, k) qf[kt][nt][k]
#endif
#define SCORE(SB, RB)                                                                                    \
  {                                                                                                      \
    float sc[U][2][NT][4];                                                                               \
    _Pragma("unroll") for (int u = 0; u < U; ++u)                                                        \
    _Pragma("unroll") for (int ch = 0; ch < 2; ++ch)                                                     \
    _Pragma("unroll") for (int nt = 0; nt < NT; ++nt)                                                    \
      sc[u][ch][nt][0] = sc[u][ch][nt][1] = sc[u][ch][nt][2] = sc[u][ch][nt][3] = 0.f;                   \
    _Pragma("unroll") for (int kt = 0; kt < KT; ++kt) {                                                  \
      QLOAD(kt)                                                                                          \
      _Pragma("unroll") for (int u = 0; u < U; ++u) {                                                    \
        unsigned a0, a1, a2, a3;                                                                         \
        ldsm4(a0, a1, a2, a3, TILE_ADDR(SB, u, (j & 1) * 8 + i8, kt * 16 + (j >> 1) * 8));               \
        _Pragma("unroll") for (int nt = 0; nt < NT; ++nt)                                                \
          mma(sc[u][kt & 1][nt], a0, a1, a2, a3, QF(kt, nt, 0), QF(kt, nt, 1));                          \
      }                                                                                                  \
    }                                                                                                    \
    float* rw = (RB) + w * RHN * RS;                                                                     \
    _Pragma("unroll") for (int u = 0; u < U; ++u)                                                        \
    _Pragma("unroll") for (int nt = 0; nt < NT; ++nt) {                                                  \
      const int h0 = nt * 8 + 2 * c, r = u * 16 + g;                                                     \
      RSTORE(rw, h0 * RS + r, h0, nt, sc[u][0][nt][0] + sc[u][1][nt][0])                                 \
      RSTORE(rw, (h0 + 1) * RS + r, h0 + 1, nt, sc[u][0][nt][1] + sc[u][1][nt][1])                       \
      RSTORE(rw, h0 * RS + r + 8, h0, nt, sc[u][0][nt][2] + sc[u][1][nt][2])                             \
      RSTORE(rw, (h0 + 1) * RS + r + 8, h0 + 1, nt, sc[u][0][nt][3] + sc[u][1][nt][3])                   \
    }                                                                                                    \
  }
#define STAGE_ADDR(t) smem_u32(xs + (MODE == 2 ? 0 : ((t) % STAGES)) * STAGE_HALVES)
#define RED(t) (red + (NREDB > 1 ? ((t) & 1) * (NW * RHN * RS) : 0))

// one tile after its scores are summed: the online softmax (float32, running max and sum per head)
// at this thread's operand positions of the next product (head nt*8+g, tile rows u*16 + 2c, 2c+1,
// 2c+8, 2c+9; `masked(row)` leaves a row out), the accumulators rescaled, and O'^T[e][h] += X_tile^T . P;
// the tile at sbase (one stage), or (UR) its 16-row units at sbase and sbase_1
template <int NWR_, class Masked>
__device__ __forceinline__ void softmax_pv(const float* rsum, Masked masked, unsigned sbase, unsigned sbase_1,
                                           float (&acc)[MT][NT][4], float (&m_run)[NT], float (&l_run)[NT], int g,
                                           int c, int j, int i8) {
#if UR
  const unsigned sbase_0 = sbase;
#endif
  unsigned pb[U][NT][2];
  float al[NT];
#if LAZY
  bool moved = false;  // some head of this lane raised its running max in this tile
#endif
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float sv[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      const float* p = rsum + RROW(nt) * RS + u * 16 + 2 * c;
#pragma unroll
      for (int ww = 0; ww < NWR_; ++ww) {
        const float2 x0 = *reinterpret_cast<const float2*>(p + ww * RHN * RS);
        const float2 x1 = *reinterpret_cast<const float2*>(p + ww * RHN * RS + 8);
        s0 += x0.x; s1 += x0.y; s2 += x1.x; s3 += x1.y;
      }
      const int rr = u * 16 + 2 * c;
      sv[u][0] = masked(rr) ? -2.0e30f : s0;
      sv[u][1] = masked(rr + 1) ? -2.0e30f : s1;
      sv[u][2] = masked(rr + 8) ? -2.0e30f : s2;
      sv[u][3] = masked(rr + 9) ? -2.0e30f : s3;
    }
    float mx = -2.0e30f;
#pragma unroll
    for (int u = 0; u < U; ++u) mx = fmaxf(mx, fmaxf(fmaxf(sv[u][0], sv[u][1]), fmaxf(sv[u][2], sv[u][3])));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
#if LAZY
    // the running max moves only where the tile's passes it by more than LAZY_LOG2 (log2 units), so
    // a probability stays ≤ 2^LAZY_LOG2 (fp16 holds it at the same relative precision)
    const bool up = (mx - m_run[nt]) * LOG2E > LAZY_LOG2;
    const float mn = up ? mx : m_run[nt], mnl = mn * LOG2E;
    al[nt] = up ? ex2(m_run[nt] * LOG2E - mnl) : 1.f;
    moved |= up;
#define PROB(s) ex2(fmaf(s, LOG2E, -mnl))
#else
    const float mn = fmaxf(m_run[nt], mx);
    al[nt] = ex2((m_run[nt] - mn) * LOG2E);
#define PROB(s) ex2(((s) - mn) * LOG2E)
#endif
    float ls = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float p0 = PROB(sv[u][0]), p1 = PROB(sv[u][1]);
      const float p2 = PROB(sv[u][2]), p3 = PROB(sv[u][3]);
#undef PROB
      ls += (p0 + p1) + (p2 + p3);
      pb[u][nt][0] = pack_h2(p0, p1);
      pb[u][nt][1] = pack_h2(p2, p3);
    }
    l_run[nt] = l_run[nt] * al[nt] + ls;
    m_run[nt] = mn;
  }
  // rescale the accumulators (their heads are nt*8 + 2c and + 1: held by lanes 8c and 8c + 4); LAZY:
  // only in a tile where some head of the warp moved its running max (a branch the whole warp takes)
#if LAZY
  if (__any_sync(0xffffffffu, moved))
#endif
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float a_lo = __shfl_sync(0xffffffffu, al[nt], 8 * c);
    const float a_hi = __shfl_sync(0xffffffffu, al[nt], 8 * c + 4);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][nt][0] *= a_lo; acc[mt][nt][1] *= a_hi;
      acc[mt][nt][2] *= a_lo; acc[mt][nt][3] *= a_hi;
    }
  }
  // O'^T[e][h] += X_tile^T . P
#ifdef STALL_WARP
  // tests only: one warp reads the tile late, so a stage refilled before every warp is done with it shows
  if ((threadIdx.x >> 5) == STALL_WARP) __nanosleep(STALL_NS);
#endif
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      unsigned a0, a1, a2, a3;
      ldsm4t(a0, a1, a2, a3, TILE_ADDR(sbase, u, (j >> 1) * 8 + i8, mt * 16 + (j & 1) * 8));
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma(acc[mt][nt], a0, a1, a2, a3, pb[u][nt][0], pb[u][nt][1]);
    }
}

// q' of a warp's column slice as B fragments of S^T = X_tile . q'^T (k = column, n = head); qb points at
// the clip's first head, at the warp's first column
__device__ __forceinline__ void load_q(unsigned (&qf)[KT][NT][2], const unsigned short* qb, int sqh, int g, int c) {
#pragma unroll
  for (int kt = 0; kt < KT; ++kt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int h = nt * 8 + g;
      if (h < HN) {
        const unsigned short* p = qb + (long long)h * sqh + kt * 16 + 2 * c;
        qf[kt][nt][0] = *reinterpret_cast<const unsigned*>(p);
        qf[kt][nt][1] = *reinterpret_cast<const unsigned*>(p + 8);
      } else {
        qf[kt][nt][0] = 0u;
        qf[kt][nt][1] = 0u;
      }
    }
}

// the persistent form's hand-over of a clip cut between two blocks: a thread's part (its accumulators,
// running max and sum) in a slot, thread-major so that the stores and loads coalesce
#define PART_STRIDE (NW * 32)
__device__ __forceinline__ void put_part(float* slot, const float (&acc)[MT][NT][4], const float (&m_run)[NT],
                                         const float (&l_run)[NT]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) slot[((mt * NT + nt) * 4 + k) * PART_STRIDE] = acc[mt][nt][k];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    slot[(MT * NT * 4 + nt) * PART_STRIDE] = m_run[nt];
    slot[(MT * NT * 4 + NT + nt) * PART_STRIDE] = l_run[nt];
  }
}
__device__ __forceinline__ void get_part(const float* slot, float (&acc)[MT][NT][4], float (&m_run)[NT], float (&l_run)[NT]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[mt][nt][k] = __ldcg(slot + ((mt * NT + nt) * 4 + k) * PART_STRIDE);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    m_run[nt] = __ldcg(slot + (MT * NT * 4 + nt) * PART_STRIDE);
    l_run[nt] = __ldcg(slot + (MT * NT * 4 + NT + nt) * PART_STRIDE);
  }
}
// the part in `slot` (a clip's later tiles) merged into this thread's (its first tiles): always in this
// order, so the bits do not depend on which block merged
__device__ __forceinline__ void merge_part(const float* slot, float (&acc)[MT][NT][4], float (&m_run)[NT],
                                           float (&l_run)[NT], int c) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float mp = __ldcg(slot + (MT * NT * 4 + nt) * PART_STRIDE);
    const float lp = __ldcg(slot + (MT * NT * 4 + NT + nt) * PART_STRIDE);
    const float mn = fmaxf(m_run[nt], mp);
    const float a_own = ex2((m_run[nt] - mn) * LOG2E), a_p = ex2((mp - mn) * LOG2E);
    l_run[nt] = l_run[nt] * a_own + lp * a_p;
    m_run[nt] = mn;
    // the accumulators' heads are nt*8 + 2c and + 1: their scales from lanes 8c and 8c + 4
    const float o_lo = __shfl_sync(0xffffffffu, a_own, 8 * c), o_hi = __shfl_sync(0xffffffffu, a_own, 8 * c + 4);
    const float p_lo = __shfl_sync(0xffffffffu, a_p, 8 * c), p_hi = __shfl_sync(0xffffffffu, a_p, 8 * c + 4);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float* s4 = slot + ((mt * NT + nt) * 4) * PART_STRIDE;
      acc[mt][nt][0] = acc[mt][nt][0] * o_lo + __ldcg(s4) * p_lo;
      acc[mt][nt][1] = acc[mt][nt][1] * o_hi + __ldcg(s4 + PART_STRIDE) * p_hi;
      acc[mt][nt][2] = acc[mt][nt][2] * o_lo + __ldcg(s4 + 2 * PART_STRIDE) * p_lo;
      acc[mt][nt][3] = acc[mt][nt][3] * o_hi + __ldcg(s4 + 3 * PART_STRIDE) * p_hi;
    }
  }
}

// the normalized output of one clip: ob points at its first head's row, at this warp's first column
__device__ __forceinline__ void write_out(unsigned short* ob, int soh, const float (&acc)[MT][NT][4],
                                          const float (&l_run)[NT], int g, int c) {
  ob += g;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float l = l_run[nt];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int hl = nt * 8 + 2 * c, hh = hl + 1;  // the heads of this lane's accumulators
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float i_lo = __shfl_sync(0xffffffffu, inv, 8 * c);
    const float i_hi = __shfl_sync(0xffffffffu, inv, 8 * c + 4);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (hl < HN) {
        ob[(long long)hl * soh + mt * 16] = to_h(acc[mt][nt][0] * i_lo);
        ob[(long long)hl * soh + mt * 16 + 8] = to_h(acc[mt][nt][2] * i_lo);
      }
      if (hh < HN) {
        ob[(long long)hh * soh + mt * 16] = to_h(acc[mt][nt][1] * i_hi);
        ob[(long long)hh * soh + mt * 16 + 8] = to_h(acc[mt][nt][3] * i_hi);
      }
    }
  }
}

#if !PERSIST
#if CL > 1
extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(NW * 32, 1)
#else
extern "C" __global__ void __launch_bounds__(NW * 32, 1)
#endif
hidden_attn_cuda(const unsigned short* __restrict__ Q, const unsigned short* __restrict__ X,
                 unsigned short* __restrict__ O, float* __restrict__ Mp, float* __restrict__ Lp,
                 float* __restrict__ Ap, int S, int chunk, int sqb, int sqh, int sob, int soh, int nsplit) {
  extern __shared__ __attribute__((aligned(16))) unsigned char smem[];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
#if CL > 1
  // a cluster of CL blocks per clip (and split): block `rank` holds columns [rank * EL, (rank + 1) * EL)
  // of the accumulators; the partial scores of the blocks meet through distributed shared memory
  const unsigned rank = cluster_rank();
  const int sp = blockIdx.x / CL, b = blockIdx.y;
#else
  const unsigned rank = 0;
  const int sp = blockIdx.x, b = blockIdx.y;
#endif
  const int start = sp * chunk;
  const int end = min(start + chunk, S);
  const int ntiles = end > start ? (end - start + ROWS - 1) / ROWS : 0;
  const int ec = w * EW;                 // this warp's first column within the block's columns
  const int e0 = (int)rank * EL + ec;    // ... and within the row
#if BULK
  unsigned short* xs = reinterpret_cast<unsigned short*>(smem) + ec;  // this warp's columns of stage 0
#else
  unsigned short* xs = reinterpret_cast<unsigned short*>(smem) + w * STAGES * STAGE_HALVES;
#endif
  float* red = reinterpret_cast<float*>(smem + XS_HALVES * 2);
  float* tot = red + NREDB * NW * HP * RS;  // RED2: the summed scores of a tile
  const unsigned short* xb = X + (long long)b * S * E + e0;

  // q' of this warp's column slice as B fragments of S^T = X_tile . q'^T (k = column, n = head):
  // in registers for the whole kernel, or (QS) in shared memory, read per tile with ldmatrix
  const unsigned short* qb = Q + (long long)b * sqb;
#if QS
  unsigned short* qs = reinterpret_cast<unsigned short*>(smem + XS_HALVES * 2 + (NREDB * NW + TOTN) * HP * RS * 4) + w * HP * QPITCH;
  for (int i = lane; i < HP * CPR; i += 32) {
    const int h = i / CPR, cc = i % CPR;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (h < HN) v = *reinterpret_cast<const uint4*>(qb + (long long)h * sqh + e0 + cc * 8);
    *reinterpret_cast<uint4*>(qs + h * QPITCH + cc * 8) = v;
  }
  __syncwarp();
  const unsigned qbase = smem_u32(qs);
#else
  unsigned qf[KT][NT][2];
  load_q(qf, qb + e0, sqh, g, c);
#endif

#if BULK
  unsigned short* xall = reinterpret_cast<unsigned short*>(smem);
  const unsigned bars = smem_u32(smem + XS_HALVES * 2 + (NREDB * NW + TOTN) * HP * RS * 4 + (QS ? NW * HP * QPITCH * 2 : 0));
  // rows past the end are never copied: zero them once so a masked row is 0, never stale NaN
  for (int i = threadIdx.x; i < XS_HALVES / 8; i += NW * 32)
    reinterpret_cast<uint4*>(xall)[i] = make_uint4(0u, 0u, 0u, 0u);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the zeros before the bulk copies' writes
  if (threadIdx.x == 0) {
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(bars + 8 * st, 1);                 // full: the copies of the stage's tile landed
      mbar_init(bars + 8 * (STAGES + st), NW);     // empty: every warp is done with the stage's tile
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#if CL > 1
  cluster_sync();  // every block of the cluster has started before any writes into another's shared memory
#else
  __syncthreads();
#endif
  auto load = [&](int t) {  // warp 0: one bulk copy of a whole row per lane, completing on the stage's barrier
    const int st = t % STAGES;
    const int r0 = start + t * ROWS;
    const int nr = min(ROWS, end - r0);
    const unsigned bar = bars + 8 * st;
    if (lane == 0) mbar_expect_tx(bar, nr * EL * 2);
    __syncwarp();
    if (lane < nr)
      bulk_copy(smem_u32(xall + st * STAGE_HALVES) + lane * PITCH * 2, X + ((long long)b * S + r0 + lane) * E + rank * EL,
                EL * 2, bar);
  };
#else
  auto load = [&](int t) {
    const int r0 = start + t * ROWS;
    const unsigned base = smem_u32(xs + (t % STAGES) * STAGE_HALVES);
#pragma unroll
    for (int i = lane; i < CHUNKS; i += 32) {
      const int r = i / CPR, cc = i % CPR;
      const int row = r0 + r;
      const bool ok = row < end;
      const unsigned short* src = xb + (long long)(ok ? row : start) * E + cc * 8;
      cp_async16(base + (r * PITCH + cc * 8) * 2, src, ok ? 16 : 0);
    }
  };
#endif

#if BULK
  if (w == 0)
    for (int t = 0; t < STAGES - 1; ++t)
      if (t < ntiles) load(t);
#else
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) {
    if (t < ntiles) load(t);
    cp_commit();
  }
#endif

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[mt][nt][k] = 0.f;
  float m_run[NT], l_run[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) { m_run[nt] = -1.0e30f; l_run[nt] = 0.f; }

  const int j = lane >> 3, i8 = lane & 7;

#if PIPE
  // software pipeline: the scores of tile t + 1 are computed beside the softmax and the weighted
  // sum of tile t (independent work for the schedulers), one block barrier per tile
  cp_wait<STAGES - 2>();
  __syncwarp();
  SCORE(STAGE_ADDR(0), RED(0))
  __syncthreads();
#endif
  for (int t = 0; t < ntiles; ++t) {
#if BULK
    // warp 0 refills the stage of tile t - 1 with tile t + STAGES - 1 as soon as every warp is done with it
    if (w == 0 && t + STAGES - 1 < ntiles) {
      if (t > 0) mbar_wait(bars + 8 * (STAGES + (t - 1) % STAGES), ((t - 1) / STAGES) & 1);
      load(t + STAGES - 1);
    }
    mbar_wait(bars + 8 * (t % STAGES), (t / STAGES) & 1);
#else
#if PIPE
    cp_wait<STAGES - 3>();
#else
    cp_wait<STAGES - 2>();
#endif
    __syncwarp();
    if (t + STAGES - 1 < ntiles && MODE != 2) load(t + STAGES - 1);
    cp_commit();
#endif
    const unsigned sbase = STAGE_ADDR(t);
    float* rb = RED(t);
#if PIPE
    SCORE(STAGE_ADDR(t + 1), RED(t + 1))
#else
    if (MODE != 1) SCORE(sbase, rb)
    __syncthreads();
    if (MODE == 1) {
      __syncwarp();
#if BULK
      if (lane == 0) mbar_arrive(bars + 8 * (STAGES + t % STAGES));
#endif
      continue;
    }
#endif
#if RED2
    // the warps' partial scores summed once (each thread a few positions), then read by all; with a
    // cluster, each block writes its sums into its own slot of every block's buffer for this tile
    // parity, and after the cluster barrier every block adds the slots in rank order (the same
    // full scores, bit for bit, in every block)
    float* tsum = tot + (CL > 1 ? (t & 1) * CL * HP * RS : 0);
    for (int idx = threadIdx.x; idx < HP * RS; idx += NW * 32) {
      float v = 0.f;
#pragma unroll
      for (int ww = 0; ww < NW; ++ww) v += rb[ww * HP * RS + idx];
#if CL > 1
      float* dst = tsum + rank * HP * RS + idx;
      *dst = v;
#pragma unroll
      for (unsigned rr = 0; rr < CL; ++rr)
        if (rr != rank) st_peer(smem_u32(dst), rr, v);
#else
      tsum[idx] = v;
#endif
    }
#if CL > 1
    cluster_sync();
#else
    __syncthreads();
#endif
    const float* rsum = tsum;
#define NWR (CL > 1 ? CL : 1)
#else
    const float* rsum = rb;
#define NWR NW
#endif

    const int rbase = start + t * ROWS;
    softmax_pv<NWR>(rsum, [&](int rr) { return rbase + rr >= end; }, sbase, sbase + 16 * PITCH * 2, acc, m_run, l_run,
                    g, c, j, i8);
#if PIPE
    __syncthreads();
#endif
    __syncwarp();
#if BULK
    if (lane == 0) mbar_arrive(bars + 8 * (STAGES + t % STAGES));
#endif
  }
  cp_wait<0>();
#if CL > 1
  cluster_sync();  // every write into another block's shared memory completes before any block leaves
#endif

  if (nsplit == 1) {
    write_out(O + (long long)b * sob + e0, soh, acc, l_run, g, c);
    return;
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float l = l_run[nt];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int h = nt * 8 + g;  // the head this lane's softmax state belongs to
    const int hl = nt * 8 + 2 * c, hh = hl + 1;  // the heads of this lane's accumulators
    if (c == 0 && h < HN) {
      const long long row = ((long long)b * HN + h) * nsplit + sp;
      Mp[row] = m_run[nt];
      Lp[row] = l;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int e = e0 + mt * 16 + g;
      if (hl < HN) {
        float* ab = Ap + (((long long)b * HN + hl) * nsplit + sp) * E + e;
        ab[0] = acc[mt][nt][0];
        ab[8] = acc[mt][nt][2];
      }
      if (hh < HN) {
        float* ab = Ap + (((long long)b * HN + hh) * nsplit + sp) * E + e;
        ab[0] = acc[mt][nt][1];
        ab[8] = acc[mt][nt][3];
      }
    }
  }
}
#else
// PERSIST: one block per multiprocessor walks a contiguous range of the batch's tiles (clip-major,
// tiles of one clip in order), so every block gets the same number of tiles whatever the batch
// (no last, partly filled wave) and its ring of stages runs on across clips. A clip cut by a range
// boundary has its first tiles at the end of block k's range and the rest at the start of block
// k + 1's: the block that ends its part second merges the other's (softmax state and accumulators,
// through global memory: P, two slots per cut, and the cut's counter in flags) and writes the clip;
// no block waits for another. Needs every range to hold at least a clip's tiles (grid ≤ clips), so
// a clip is cut at most once. Every tile is a full ROWS rows: a clip's last tile is its last ROWS rows, the rows already
// taken by the tile before it masked out, so no stage ever holds stale or unwritten rows.
extern "C" __global__ void __launch_bounds__(NW * 32, 1)
hidden_attn_cuda(const unsigned short* __restrict__ Q, const unsigned short* __restrict__ X,
                 unsigned short* __restrict__ O, float* __restrict__ P, unsigned* __restrict__ flags,
                 int B, int sqb, int sqh, int sob, int soh) {
  constexpr int S = SEQ;  // a compile-time constant here: the tile arithmetic needs no division
  extern __shared__ __attribute__((aligned(16))) unsigned char smem[];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int j = lane >> 3, i8 = lane & 7;
  constexpr int T = (S + ROWS - 1) / ROWS;  // tiles per clip
  const long long total = (long long)B * T;
  const int g0 = (int)(total * blockIdx.x / gridDim.x), n = (int)(total * (blockIdx.x + 1) / gridDim.x) - g0;
  const int ec = w * EW, e0 = ec;
  unsigned short* xs = reinterpret_cast<unsigned short*>(smem) + ec;
  unsigned short* xall = reinterpret_cast<unsigned short*>(smem);
  float* red = reinterpret_cast<float*>(smem + XS_HALVES * 2);
  float* tot = red + REDF;  // REDF: the per-warp partial scores, or (PERSIST 2) a clip's output if larger
  const unsigned bars = smem_u32(smem + XS_HALVES * 2 + (REDF + TOTN * RHN * RS) * 4);
#if LASTW
  // per stage, how many warps are done with its tile (where the "empty" barriers would be)
  unsigned* done = reinterpret_cast<unsigned*>(smem + XS_HALVES * 2 + (REDF + TOTN * RHN * RS) * 4 + 8 * STAGES);
#endif
  if (threadIdx.x == 0) {
    for (int st = 0; st < STAGES; ++st) {
      mbar_init(bars + 8 * st, 1);
#if LASTW
      done[2 * st] = 0u;
#else
      mbar_init(bars + 8 * (STAGES + st), NW);
#endif
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
#if UR
  // the unit ring: STAGES slots of 16 rows; tile i is units 2i and 2i + 1, in slots (2i) % STAGES and
  // (2i + 1) % STAGES, so up to STAGES - 2 units are on their way while a tile is computed
  auto load = [&](int k) {  // warp 0: unit k of the block, one bulk copy of a whole row per lane 0-15
    const int b = (g0 + (k >> 1)) / T, t = g0 + (k >> 1) - b * T;
    const int r0 = min(t * ROWS, S - ROWS) + (k & 1) * 16;
    const int st = k % STAGES;
    const unsigned bar = bars + 8 * st;
    if (lane == 0) mbar_expect_tx(bar, 16 * E * 2);
    __syncwarp();
    if (lane < 16)
      bulk_copy(smem_u32(xall + st * STAGE_HALVES) + lane * PITCH * 2, X + ((long long)b * S + r0 + lane) * E, E * 2, bar);
  };
  if (w == 0)
    for (int k = 0; k < STAGES; ++k)
      if (k < 2 * n) load(k);
#else
  auto load = [&](int i) {  // warp 0: tile g0 + i, one bulk copy of a whole row per lane
    const int b = (g0 + i) / T, t = g0 + i - b * T;
    const int r0 = min(t * ROWS, S - ROWS);
    const int st = i % STAGES;
    const unsigned bar = bars + 8 * st;
#define LR (MODE == 3 ? ROWS / 2 : ROWS)  // diagnostic mode 3: half the rows copied, all computed
    if (lane == 0) mbar_expect_tx(bar, LR * E * 2);
    __syncwarp();
    if (lane < LR)
      bulk_copy(smem_u32(xall + st * STAGE_HALVES) + lane * PITCH * 2, X + ((long long)b * S + r0 + lane) * E, E * 2, bar);
  };
  // LASTW: every stage is free at the start, so all of them are filled here; afterwards the last warp
  // done with a stage refills it (below). Otherwise warp 0 keeps one stage back for the loop's refill.
  if (w == 0)
    for (int i = 0; i < STAGES - 1 + (LASTW && MODE != 4); ++i)
      if (i < n) load(i);
#if PF
  // PF > 0: the PF tiles after the ring's are asked into L2 ahead of their bulk copies (one row a lane),
  // so a stage's copy reads L2 where the ring has no room for more tiles in flight
  auto prefetch = [&](int i) {
    const int b = (g0 + i) / T, t = g0 + i - b * T;
    const int r0 = min(t * ROWS, S - ROWS);
    if (lane < ROWS) prefetch_l2(X + ((long long)b * S + r0 + lane) * E, E * 2);
  };
  if (w == 0)
    for (int i = STAGES - 1; i < STAGES - 1 + PF; ++i)
      if (i < n) prefetch(i);
#endif
#endif

  float acc[MT][NT][4];
  float m_run[NT], l_run[NT];
  unsigned qf[KT][NT][2];
  int i = 0;  // the block's tile (its stage in the ring)
  load_q(qf, Q + (long long)(g0 / T) * sqb + e0, sqh, g, c);
  for (int b = g0 / T, ta = g0 - b * T; i < n; ++b, ta = 0) {
    // this block's part of clip b: tiles [ta, tb) of it, fresh state (its q' is loaded)
    const int tb = min(T, ta + n - i);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[mt][nt][k] = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) { m_run[nt] = -1.0e30f; l_run[nt] = 0.f; }
    for (int t = ta; t < tb; ++t, ++i) {
#if UR
      // warp 0 refills the slots of tile i - 1's units with the units STAGES further on once every warp
      // is done with them
      // (unit k sits in slot k % STAGES; its barriers complete in phase k / STAGES of that slot)
      if (w == 0 && i > 0) {
        for (int k = 2 * i - 2; k < 2 * i; ++k)
          if (k + STAGES < 2 * n) {
            mbar_wait(bars + 8 * (STAGES + k % STAGES), (k / STAGES) & 1);
            load(k + STAGES);
          }
      }
      const int s_0 = (2 * i) % STAGES, s_1 = (2 * i + 1) % STAGES;
      mbar_wait(bars + 8 * s_0, ((2 * i) / STAGES) & 1);
      mbar_wait(bars + 8 * s_1, ((2 * i + 1) / STAGES) & 1);
      const unsigned sbase_0 = smem_u32(xs + s_0 * STAGE_HALVES), sbase_1 = smem_u32(xs + s_1 * STAGE_HALVES);
      float* rb = red;  // one set: the sums below are read between the two barriers, before any next tile's scores
      SCORE(sbase, rb)
#else
      // warp 0 refills the stage of tile i - 1 with tile i + STAGES - 1 once every warp is done with it
      // (diagnostic mode 4: only the first stages are ever copied, the arithmetic runs on what is there)
      if (!LASTW && MODE != 4 && w == 0 && i + STAGES - 1 < n) {
        if (i > 0) mbar_wait(bars + 8 * (STAGES + (i - 1) % STAGES), ((i - 1) / STAGES) & 1);
        load(i + STAGES - 1);
#if PF
        if (i + STAGES - 1 + PF < n) prefetch(i + STAGES - 1 + PF);
#endif
      }
      if (MODE != 4 || i < STAGES - 1) mbar_wait(bars + 8 * (i % STAGES), (i / STAGES) & 1);
      const unsigned sbase = STAGE_ADDR(i);
      const unsigned sbase_0 = sbase, sbase_1 = sbase + 16 * PITCH * 2;
      float* rb = RED(i);
      SCORE(sbase, rb)
#endif
      __syncthreads();
      for (int idx = threadIdx.x; idx < RHN * RS; idx += NW * 32) {
        float v = 0.f;
#pragma unroll
        for (int ww = 0; ww < NW; ++ww) v += rb[ww * RHN * RS + idx];
        tot[idx] = v;
      }
      __syncthreads();
      const int lo = t * ROWS - min(t * ROWS, S - ROWS);  // rows of this tile the tile before took
      softmax_pv<1>(tot, [&](int rr) { return rr < lo; }, sbase_0, sbase_1, acc, m_run, l_run, g, c, j, i8);
      __syncwarp();
#if UR
      if (lane == 0) {
        mbar_arrive(bars + 8 * (STAGES + s_0));
        mbar_arrive(bars + 8 * (STAGES + s_1));
      }
#else
#if LASTW
      {  // the last warp done with this stage refills it with tile i + STAGES (no warp waits for another here;
         // the block barriers keep every warp within a tile of the others, so a counter is reset before reuse)
        unsigned prior = 0;
        if (lane == 0) {
          __threadfence_block();
          prior = atomicAdd(done + 2 * (i % STAGES), 1u);
        }
        if (__shfl_sync(0xffffffffu, prior, 0) == NW - 1) {
          if (lane == 0) done[2 * (i % STAGES)] = 0u;
          __syncwarp();  // every lane after lane 0's count, then the fences, then the copies
          __threadfence_block();
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
          if (MODE != 4 && i + STAGES < n) load(i + STAGES);
        }
      }
#else
      if (lane == 0) mbar_arrive(bars + 8 * (STAGES + i % STAGES));
#endif
#endif
    }
    {  // this block's part of clip b ends here
      // the next clip's q' on its way while this one is written out
      if (i < n) load_q(qf, Q + (long long)(b + 1) * sqb + e0, sqh, g, c);
      // A clip cut between two blocks (ta > 0: it began in the previous block; tb < T: it goes on in
      // the next) is finished by whichever of the two ends its part second. The cut's counter says
      // who came first: the first writes its part (thread-major, so the stores coalesce) to its side's
      // slot and counts itself in; the second merges that part into its own and writes the clip. No
      // block ever waits for another, so progress never depends on which blocks are resident.
      bool finish = true;
      if (ta > 0) {
        // the rest of a clip that began in the previous block: usually first, so it counts itself in
        unsigned* cnt = flags + blockIdx.x;
        put_part(P + (long long)(blockIdx.x * 2 + 1) * NV * (NW * 32) + threadIdx.x, acc, m_run, l_run);
        __threadfence();
        __syncthreads();
        unsigned v = 0;
        if (threadIdx.x == 0)
          asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(v) : "l"(cnt) : "memory");
        finish = __syncthreads_or(v != 0u);
        if (finish) {  // the first tiles' block was done before: merge in the same order it would
          get_part(P + (long long)(blockIdx.x * 2) * NV * (NW * 32) + threadIdx.x, acc, m_run, l_run);
          merge_part(P + (long long)(blockIdx.x * 2 + 1) * NV * (NW * 32) + threadIdx.x, acc, m_run, l_run, c);
          __syncthreads();
          if (threadIdx.x == 0) *cnt = 0u;  // both parts used: the counter ready for the next launch
        }
      } else if (tb < T) {
        // the first tiles of a clip that goes on in the next block: its rest is usually there by now
        unsigned* cnt = flags + blockIdx.x + 1;
        unsigned v = 0;
        if (threadIdx.x == 0)
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(cnt) : "memory");
        finish = __syncthreads_or(v != 0u);
        if (!finish) {
          put_part(P + (long long)((blockIdx.x + 1) * 2) * NV * (NW * 32) + threadIdx.x, acc, m_run, l_run);
          __threadfence();
          __syncthreads();
          if (threadIdx.x == 0)
            asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(v) : "l"(cnt) : "memory");
          finish = __syncthreads_or(v != 0u);
        }
        if (finish) {
          merge_part(P + (long long)((blockIdx.x + 1) * 2 + 1) * NV * (NW * 32) + threadIdx.x, acc, m_run, l_run, c);
          __syncthreads();
          if (threadIdx.x == 0) *cnt = 0u;
        }
      }
      if (finish) {
#if PERSIST == 2
        // through shared memory (the partial-score buffers are free until the next clip's scores):
        // every value in place, then whole rows out with 16-byte stores
        unsigned short* ost = reinterpret_cast<unsigned short*>(red);
        write_out(ost + e0, E + 8, acc, l_run, g, c);
        __syncthreads();
        unsigned short* ob = O + (long long)b * sob;
        for (int idx = threadIdx.x; idx < HN * (E / 8); idx += NW * 32) {
          const int h = idx / (E / 8), q = idx - h * (E / 8);
          *reinterpret_cast<uint4*>(ob + (long long)h * soh + q * 8) = *reinterpret_cast<const uint4*>(ost + h * (E + 8) + q * 8);
        }
        __syncthreads();
#else
        write_out(O + (long long)b * sob + e0, soh, acc, l_run, g, c);
#endif
      }
    }
  }
}
#endif
"""

_CACHE: dict[tuple, Any] = {}


def cuda_hidden_fits(H: int, E: int, warps: int) -> str | None:
    """None when the kernel takes these shapes with ``warps`` warps, else why not."""
    if H < 1 or H > 32:
        return f"{H} heads (1–32 supported)"
    if warps < 1 or E % (warps * 16):
        return f"d_model {E} does not split into {warps} slices of a multiple of 16 columns"
    return None


def cuda_hidden_available(device: Any) -> tuple[bool, str]:
    """(True, "") where the kernel can be built: a CUDA (not ROCm) device of compute capability ≥ 8.0
    (cp.async, ldmatrix, fp16 mma.sync) and NVRTC reachable through torch; else (False, why)."""
    try:
        import torch
    except Exception as e:  # pragma: no cover
        return False, f"torch unavailable: {e}"
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False, "not a CUDA device"
    if getattr(torch.version, "hip", None):
        return False, "ROCm build (the kernel is CUDA PTX)"
    if not torch.version.cuda:
        return False, "torch has no CUDA runtime"
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return False, "this torch has no NVRTC kernel compiler (torch.cuda._compile_kernel)"
    return True, ""


def score_buffers(cluster: int, unit_ring: bool = False) -> tuple[int, int]:
    """(per-warp partial-score sets, summed-score sets) in shared memory: one block keeps two
    per-warp sets (by tile parity) and one summed set; a cluster keeps one per-warp set (its
    cluster barrier orders them) and a summed set per block of the cluster and tile parity, each
    block writing its sums into every block's. The unit ring keeps one of each: its partial scores
    are summed between two block barriers, so no warp writes the next tile's before every warp has
    read this tile's."""
    if unit_ring:
        return (1, 1)
    return (1, 2 * cluster) if cluster > 1 else (2, 1)


HOPPER_BLOCK_SMEM = 232448  # the most dynamic shared memory one block may have on compute capability 9.0


def score_heads(H: int, E: int = 0, warps: int = 8, stages: int = 2, rows: int = 32, unit_ring: bool = False) -> int:
    """Heads kept per partial-score set: all, padded to the matrix tile's 8, or (unit ring, where the
    padded ones would not leave room for its units in one Hopper block) only the real ones."""
    hp = -(-H // 8) * 8
    if not unit_ring or hp == H:
        return hp
    padded = _smem_layout(E, H, warps, stages, rows, False, True, 1, 1, True, hp)
    return hp if padded <= HOPPER_BLOCK_SMEM else H


def red_floats(E: int, H: int, warps: int, rows: int, cluster: int = 1, persist: int = 0,
               unit_ring: bool = False, stages: int = 2, heads: int | None = None) -> int:
    """Floats of the per-warp partial-score buffers (for ``heads`` kept, by default
    :func:`score_heads`), or (persistent form 2) of a clip's output staged there as fp16 rows of
    E + 8 where that is larger."""
    if heads is None:
        heads = score_heads(H, E, warps, stages, rows, unit_ring)
    red = score_buffers(cluster, unit_ring)[0] * warps * heads * (rows + 4)
    return max(red, -(-H * (E + 8) // 2)) if persist == 2 else red


def _smem_layout(E: int, H: int, warps: int, stages: int, rows: int, qsmem: bool, bulk: bool, cluster: int,
                 persist: int, unit_ring: bool, heads: int) -> int:
    """The kernel's shared-memory layout in bytes with ``heads`` kept per partial-score set: the X
    stages, the per-warp and summed partial scores, q' (when held there), the stage barriers."""
    el = E // cluster
    ew = el // warps
    hp = -(-H // 8) * 8
    stage_rows = 16 if unit_ring else rows
    xs = stages * stage_rows * (el + 8) * 2 if bulk else warps * stages * rows * (ew + 8) * 2
    q = warps * hp * (ew + 8) * 2 if qsmem else 0
    tot = score_buffers(cluster, unit_ring)[1] * heads * (rows + 4) * 4
    red = red_floats(E, H, warps, rows, cluster, persist, unit_ring, stages, heads) * 4
    return xs + red + tot + q + (16 * stages if bulk else 0)


def smem_bytes(E: int, H: int, warps: int, stages: int, rows: int = 16, qsmem: bool = False, bulk: bool = False,
               cluster: int = 1, persist: int = 0, unit_ring: bool = False) -> int:
    """Dynamic shared memory of one block: the X stages (of the block's E / cluster columns; with
    the unit ring, ``stages`` units of 16 rows), the partial-score buffers, q' (when held there)
    and the stage barriers (bulk copies)."""
    return _smem_layout(E, H, warps, stages, rows, qsmem, bulk, cluster, persist, unit_ring,
                        score_heads(H, E, warps, stages, rows, unit_ring))


def handover_values(H: int, E: int, warps: int) -> int:
    """Values one thread of the persistent form hands over for a clip cut between two blocks: its
    accumulators ([E / warps / 16] × [heads / 8] matrix tiles of 4) and its running max and sum per
    head tile."""
    nt = -(-H // 8)
    return (E // warps // 16) * nt * 4 + 2 * nt


def persist_blocks(device: Any) -> int:
    """Blocks of the persistent form: one per multiprocessor (a block takes a whole one)."""
    import torch

    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _set_smem(kernel: Any, nbytes: int) -> None:
    """Allow ``nbytes`` of dynamic shared memory (over the 48 KB default) for the kernel."""
    if hasattr(kernel, "set_shared_memory_config"):
        kernel.set_shared_memory_config(nbytes)
        return
    from torch.cuda import _utils

    lib = _utils._get_gpu_runtime_library()
    rc = lib.cuFuncSetAttribute(kernel.func, 8, int(nbytes))  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    if rc != 0:
        raise RuntimeError(f"cuFuncSetAttribute(max dynamic shared memory {nbytes}) failed: {rc}")


def kernel_attributes(kernel: Any) -> dict[str, int]:
    """Registers per thread and local (spilled) bytes of the compiled kernel, for the bench."""
    import ctypes

    from torch.cuda import _utils

    lib = _utils._get_gpu_runtime_library()
    out = {}
    for name, attr in (("registers", 4), ("local_bytes", 3), ("max_threads", 0)):
        v = ctypes.c_int(0)
        if lib.cuFuncGetAttribute(ctypes.byref(v), attr, kernel.func) == 0:
            out[name] = int(v.value)
    return out


def kernel_source(H: int, E: int, warps: int, stages: int, rows: int = 16, qsmem: bool = False, pipe: bool = False,
                  bulk: bool = False, red2: bool = False, mode: int = 0, cluster: int = 1, persist: int = 0,
                  seq: int = 0, unit_ring: bool = False, lazy: bool = False, prefetch: int = 0,
                  last_refills: bool = False) -> str:
    """The CUDA source for these shapes and this form (one clear error for a combination the
    kernel does not take)."""
    if last_refills and (persist not in (1, 2) or unit_ring or prefetch):
        raise ValueError("CudaHiddenAttention: the last warp's refill goes with the persistent form's stages (not the "
                         f"unit ring, no L2 prefetch); got persist {persist}, unit ring {unit_ring}, prefetch {prefetch}")
    if prefetch != int(prefetch) or (prefetch and (persist not in (1, 2) or unit_ring or not 0 < prefetch <= 8)):
        raise ValueError("CudaHiddenAttention: the L2 prefetch goes with the persistent form's stages (not the unit "
                         f"ring), 1–8 tiles ahead; got prefetch {prefetch}, persist {persist}, unit ring {unit_ring}")
    if cluster not in (1, 2):
        raise ValueError(f"CudaHiddenAttention: cluster must be 1 or 2, got {cluster}")
    if cluster > 1 and (not bulk or not red2 or pipe or qsmem):
        raise ValueError("CudaHiddenAttention: a cluster of blocks goes with bulk copies and scores summed once "
                         "(not pipelined, q' in registers)")
    if persist and (not bulk or not red2 or pipe or qsmem or mode in (1, 2) or cluster > 1):
        raise ValueError("CudaHiddenAttention: the persistent form goes with bulk copies and scores summed once "
                         "(not pipelined, q' in registers, one block per clip range, diagnostic modes 3 and 4 only)")
    if mode in (3, 4) and not persist:
        raise ValueError(f"CudaHiddenAttention: diagnostic mode {mode} is for the persistent form")
    if unit_ring and (persist != 1 or rows != 32 or mode):
        raise ValueError("CudaHiddenAttention: the unit ring goes with the persistent form's direct stores "
                         f"(persist 1, got {persist}), 32-row tiles (got {rows}) and no diagnostic mode (got {mode})")
    if E % cluster:
        raise ValueError(f"CudaHiddenAttention: d_model {E} does not split over a cluster of {cluster}")
    why = cuda_hidden_fits(H, E // cluster, warps)
    if why:
        raise ValueError(f"CudaHiddenAttention: {why}" + (f" (per block of a cluster of {cluster})" if cluster > 1 else ""))
    if stages < 2 or (pipe and stages < 3):
        raise ValueError(f"CudaHiddenAttention: stages must be ≥ {3 if pipe else 2}"
                         f"{' for the pipelined kernel' if pipe else ''}, got {stages}")
    if rows not in ROWS_CHOICES:
        raise ValueError(f"CudaHiddenAttention: rows must be one of {ROWS_CHOICES}, got {rows}")
    if mode not in (0, 1, 2, 3, 4):
        raise ValueError(f"CudaHiddenAttention: mode must be 0–4, got {mode}")
    if bulk and (pipe or mode == 2):
        raise ValueError("CudaHiddenAttention: bulk copies go with the plain loop (not pipelined, not mode 2)")
    defines = {"E": E, "HN": H, "NT": -(-H // 8), "NW": warps, "EW": E // cluster // warps, "STAGES": stages, "ROWS": rows,
               "MODE": int(mode), "QS": int(bool(qsmem)), "PIPE": int(bool(pipe)), "BULK": int(bool(bulk)),
               "RED2": int(bool(red2)), "CL": int(cluster), "PERSIST": int(persist), "UR": int(bool(unit_ring))}
    if lazy:
        defines.update(LAZY=1, LAZY_LOG2=f"{float(LAZY_LOG2)!r}f")
    else:
        defines["LAZY"] = 0
    defines["PF"] = int(prefetch)
    defines["LASTW"] = int(bool(last_refills))
    defines["RHN"] = score_heads(H, E, warps, stages, rows, unit_ring)
    defines["REDF"] = red_floats(E, H, warps, rows, cluster, persist, unit_ring, stages, defines["RHN"])
    if persist:
        if persist not in (1, 2):
            raise ValueError(f"CudaHiddenAttention: persist must be 0, 1 or 2, got {persist}")
        if seq < rows:
            raise ValueError(f"CudaHiddenAttention: the persistent form needs at least {rows} encoder positions, got {seq}")
        defines["SEQ"] = int(seq)  # the persistent form is built per sequence length
        defines["NV"] = handover_values(H, E, warps)
    defines["NREDB"], defines["TOTN"] = score_buffers(cluster, unit_ring)
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + _SOURCE


def build_kernel(H: int, E: int, warps: int, stages: int, rows: int = 16, qsmem: bool = False, pipe: bool = False,
                 bulk: bool = False, red2: bool = False, mode: int = 0, cluster: int = 1, persist: int = 0,
                 seq: int = 0, unit_ring: bool = False, lazy: bool = False, prefetch: int = 0,
                 last_refills: bool = False) -> Any:
    """The compiled kernel for these shapes (NVRTC, cached per process) and its shared memory in
    bytes. ``mode`` is for the bench only: 1 streams X without the arithmetic, 2 does the
    arithmetic on one resident tile; for the persistent form, 3 copies half of each tile's rows
    and 4 only the first stages, with all the arithmetic (outputs meaningless)."""
    import torch

    src = kernel_source(H, E, warps, stages, rows, qsmem, pipe, bulk, red2, mode, cluster, persist, seq, unit_ring,
                        lazy, prefetch, last_refills)
    key = (src, torch.cuda.current_device())
    if key in _CACHE:
        return _CACHE[key]
    if (bulk or cluster > 1) and torch.cuda.get_device_capability()[0] < 9:
        raise ValueError("CudaHiddenAttention: bulk copies and clusters of blocks need compute capability ≥ 9.0")
    nbytes = smem_bytes(E, H, warps, stages, rows, qsmem, bulk, cluster, persist, unit_ring)
    limit = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "shared_memory_per_block_optin", 0)
    if limit and nbytes > limit:
        raise ValueError(f"CudaHiddenAttention: needs {nbytes} bytes of shared memory, the card allows {limit}")
    kernel = torch.cuda._compile_kernel(src, "hidden_attn_cuda", nvcc_options=["-std=c++17"])
    _set_smem(kernel, nbytes)
    _CACHE[key] = (kernel, nbytes)
    return _CACHE[key]


class CudaHiddenAttention:
    """Drop-in for :class:`~.whisper_fast.HiddenAttention` on CUDA cards (see the module doc):
    ``__call__(q', X)`` with q' [B, H, E] (scale included; any strides over B and H, E contiguous)
    and X [B, S, E] contiguous fp16 returns a [B, H, E] view of a head-major [H, B, E] buffer.
    Launch-only: safe inside a device-graph capture."""

    def __init__(self, B: int, H: int, S: int, E: int, *, warps: int = 8, stages: int = 3, splits: int = 1,
                 rows: int = 16, qsmem: bool = False, pipe: bool = False, bulk: bool = False, red2: bool = False,
                 mode: int = 0, cluster: int = 1, persist: int = 0, unit_ring: bool = False, lazy: bool = False,
                 prefetch: int = 0, last_refills: bool = False, blocks: int | None = None, device: Any = None,
                 dtype: Any = None) -> None:
        import torch

        if dtype is not None and dtype != torch.float16:
            raise ValueError(f"CudaHiddenAttention: fp16 only, got {dtype}")
        self.B, self.H, self.S, self.E = B, H, S, E
        self.warps, self.stages, self.splits = int(warps), int(stages), max(1, int(splits))
        self.rows, self.qsmem, self.pipe, self.bulk, self.red2 = int(rows), bool(qsmem), bool(pipe), bool(bulk), bool(red2)
        self.cluster, self.persist, self.unit_ring, self.lazy = int(cluster), int(persist), bool(unit_ring), bool(lazy)
        self.prefetch, self.last_refills = int(prefetch), bool(last_refills)
        if blocks is not None and not self.persist:
            raise ValueError(f"CudaHiddenAttention: blocks (got {blocks}) is for the persistent form; "
                             "the per-clip forms launch a block per clip and split")
        if self.persist and self.splits > 1:
            raise ValueError(f"CudaHiddenAttention: the persistent form splits the batch's tiles itself, got splits {splits}")
        self.mode = int(mode)
        dev = torch.device(device if device is not None else "cuda")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # with_blocks builds on this card, not the current one
        self.device = dev
        with torch.cuda.device(dev):
            self.kernel, self.smem = build_kernel(H, E, self.warps, self.stages, self.rows, self.qsmem, self.pipe,
                                                  self.bulk, self.red2, mode, self.cluster, self.persist, S,
                                                  self.unit_ring, self.lazy, self.prefetch, self.last_refills)
        chunk = -(-S // self.splits)
        self.chunk = -(-chunk // self.rows) * self.rows
        self.out, self.mp, self.lp, self.ap = split_buffers(B, H, E, self.splits, device, torch.float16)
        if self.persist:
            # one block per multiprocessor (never more blocks than clips: a clip is cut at most once);
            # per cut between two blocks, a slot for each side's part and a counter (zero between launches)
            if blocks is not None and int(blocks) < 1:
                raise ValueError(f"CudaHiddenAttention: blocks must be ≥ 1, got {blocks}")
            self.grid = min(B, int(blocks) if blocks is not None else persist_blocks(dev))
            self.parts = torch.empty(self.grid * 2 * handover_values(H, E, self.warps) * 32 * self.warps,
                                     device=dev, dtype=torch.float32)
            self.flags = torch.zeros(self.grid + 1, device=dev, dtype=torch.int32)

    # the build settings, in the order of a CUDA_HIDDEN_CONFIGS tuple
    SETTINGS = ("warps", "stages", "splits", "rows", "qsmem", "pipe", "bulk", "red2", "mode", "cluster", "persist",
                "unit_ring", "lazy", "prefetch", "last_refills")

    @property
    def _settings(self) -> dict[str, Any]:
        """What builds this kernel, as keyword arguments: with_blocks builds the same one."""
        return {name: getattr(self, name) for name in self.SETTINGS}

    def with_blocks(self, blocks: int) -> "CudaHiddenAttention":
        """The same kernel for the same shapes on ``blocks`` blocks (the persistent form only), e.g.
        one block per multiprocessor of a share of the card: a second wave of blocks would wait for
        the first while the share's other multiprocessors idle. Its own buffers; the same device."""
        if not self.persist:
            raise ValueError("CudaHiddenAttention.with_blocks: the per-clip forms launch a block per clip and split")
        return type(self)(self.B, self.H, self.S, self.E, **self._settings, blocks=blocks, device=self.device)

    @staticmethod
    def config_kwargs(cfg: tuple[int, ...]) -> dict[str, int]:
        """A :data:`CUDA_HIDDEN_CONFIGS` tuple (warps, stages, splits, rows, qsmem, pipe, bulk, red2[, mode[,
        cluster[, persist[, unit_ring[, lazy[, prefetch[, last_refills]]]]]]]) as keyword arguments."""
        names = CudaHiddenAttention.SETTINGS
        if len(cfg) > len(names):
            raise ValueError(f"CudaHiddenAttention: a configuration has at most {len(names)} elements, got {cfg}")
        return dict(zip(names, cfg))

    @classmethod
    def from_config(cls, B: int, H: int, S: int, E: int, cfg: tuple[int, ...], **kw: Any) -> "CudaHiddenAttention":
        """From a :data:`CUDA_HIDDEN_CONFIGS` tuple (see :meth:`config_kwargs`)."""
        return cls(B, H, S, E, **cls.config_kwargs(cfg), **kw)

    @staticmethod
    def config_key(cfg: tuple[int, ...]) -> str:
        flags = "".join(f for f, on in zip(("q", "p", "t", "r"), cfg[4:8]) if on)
        return f"cuda w{cfg[0]} st{cfg[1]} s{cfg[2]} r{cfg[3]}" + (f" {flags}" if flags else "") + \
            (f" mode{cfg[8]}" if len(cfg) > 8 and cfg[8] else "") + (f" c{cfg[9]}" if len(cfg) > 9 and cfg[9] > 1 else "") + \
            ({0: "", 1: " persistent", 2: " persistent staged"}.get(cfg[10], f" persist{cfg[10]}") if len(cfg) > 10 else "") + \
            (" unit ring" if len(cfg) > 11 and cfg[11] else "") + (" lazy" if len(cfg) > 12 and cfg[12] else "") + \
            (f" L2+{cfg[13]}" if len(cfg) > 13 and cfg[13] else "") + \
            (" last-refill" if len(cfg) > 14 and cfg[14] else "")

    def label(self) -> str:
        parts = [f"warps {self.warps}",
                 f"a ring of {self.stages} 16-row units" if self.unit_ring else f"stages {self.stages}",
                 f"rows {self.rows}",
                 "q' in shared memory" if self.qsmem else "q' in registers",
                 "bulk-copy loads" if self.bulk else "cp.async loads"]
        if self.pipe:
            parts.append("pipelined")
        if self.red2:
            parts.append("scores summed once")
        if self.lazy:
            parts.append("lazy rescale")
        if self.prefetch:
            parts.append(f"{self.prefetch} tiles ahead asked into L2")
        if self.last_refills:
            parts.append("the last warp done with a stage refills it")
        if self.cluster > 1:
            parts.append(f"a cluster of {self.cluster} blocks per clip")
        if self.persist:
            parts.append(f"persistent: {self.grid} blocks over the batch's tiles"
                         + (", output staged in shared memory" if self.persist == 2 else ""))
        return (f"cuda shared-hidden attention ({', '.join(parts)}, splits {self.splits}, "
                f"{self.smem // 1024} KB shared memory)")

    def __call__(self, qp: Any, x: Any) -> Any:
        import torch

        if tuple(qp.shape) != (self.B, self.H, self.E) or tuple(x.shape) != (self.B, self.S, self.E):
            raise ValueError(f"CudaHiddenAttention: built for q' {(self.B, self.H, self.E)} and X "
                             f"{(self.B, self.S, self.E)}, got {tuple(qp.shape)} and {tuple(x.shape)}")
        if qp.stride(2) != 1 or not x.is_contiguous():
            raise ValueError("CudaHiddenAttention: q' needs a contiguous last dimension and X [B, S, E] contiguous")
        if x.data_ptr() % 16:
            raise ValueError("CudaHiddenAttention: X must be 16-byte aligned (16-byte copies)")
        if x.device != self.out.device or qp.device != self.out.device:
            raise ValueError(f"CudaHiddenAttention: built on {self.out.device}, got q' on {qp.device} and X on {x.device}")
        if qp.dtype != torch.float16 or x.dtype != torch.float16:
            raise ValueError(f"CudaHiddenAttention: fp16 inputs only, got {qp.dtype} and {x.dtype}")
        if self.qsmem and (qp.stride(0) % 8 or qp.stride(1) % 8 or qp.data_ptr() % 16):
            raise ValueError("CudaHiddenAttention: q' must be 16-byte aligned with strides of 8 elements")
        if qp.stride(0) % 2 or qp.stride(1) % 2 or qp.data_ptr() % 4:
            raise ValueError("CudaHiddenAttention: q' must be 4-byte aligned with even strides")
        with torch.cuda.device(x.device):
            if self.persist:
                self.kernel(grid=(self.grid, 1, 1), block=(32 * self.warps, 1, 1),
                            args=[qp, x, self.out, self.parts, self.flags, self.B, qp.stride(0), qp.stride(1),
                                  self.out.stride(0), self.out.stride(1)],
                            shared_mem=self.smem)
                return self.out
            self.kernel(grid=(self.splits * self.cluster, self.B, 1), block=(32 * self.warps, 1, 1),
                        args=[qp, x, self.out, self.mp, self.lp, self.ap, self.S, self.chunk, qp.stride(0),
                              qp.stride(1), self.out.stride(0), self.out.stride(1), self.splits],
                        shared_mem=self.smem)
        return self.out if self.splits == 1 else merge_splits(self.out, self.mp, self.lp, self.ap)
