"""Legacy 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_0, IQ4_NL).

Block layouts (ggml `block_*` structs, little-endian, fp16 = IEEE half):

    Q4_0   18 B: d fp16 | qs[16]                y = d * (q - 8)
    Q4_1   20 B: d fp16 | m fp16 | qs[16]       y = d * q + m
    Q5_0   22 B: d fp16 | qh u32 | qs[16]       y = d * (q - 16)
    Q5_1   24 B: d fp16 | m fp16 | qh u32 | qs[16]   y = d * q + m
    Q8_0   34 B: d fp16 | qs int8[32]           y = d * q
    Q6_0   26 B: d fp16 | qh[8] | qs[16]        y = d * (q - 32)        (ik_llama.cpp only)
    IQ4_NL 18 B: d fp16 | qs[16]                y = d * kvalues_iq4nl[q]

In every 4-bit `qs[16]`, byte j holds weight j in its low nibble and weight j+16 in its high nibble.
Q5_0/Q5_1 keep the fifth bit of weight k in bit k of `qh`. Q6_0 keeps two high bits per weight in
`qh[8]`: weight j (j < 16) uses bits 4*(j//8)..+1 of qh[j%8], weight j+16 the two bits above those.

The helpers here (block view, fp16 fields, nibble/bit unpacking) are shared by the K-quant and IQ4
modules. All work on CPU and CUDA tensors alike.
"""

from __future__ import annotations

import torch

from vramfit.quant.registry import Codec, register

QK = 32  # weights per legacy block

# kvalues_iq4nl (== iq4k_values[0..15], docs/iqk-formats.md Appendix A)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---------------------------------------------------------------------------------------------
# shared helpers


def blocks(data: torch.Tensor, type_size: int) -> torch.Tensor:
    """(rows, row_nbytes) uint8 -> (rows, nblocks, type_size) uint8."""
    return data.reshape(data.shape[0], -1, type_size)


def f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block: (rows, nb, type_size) -> (rows, nb, 1) float32."""
    return b[..., offset : offset + 2].contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) uint8: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def bit_fields(b: torch.Tensor, width: int) -> torch.Tensor:
    """Split each byte into 8/width fields, lowest first: (..., n) uint8 -> (..., 8/width, n) uint8.

    out[..., k, i] = (b[..., i] >> (width*k)) & (2**width - 1)
    """
    n_fields = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device).view(n_fields, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def bits_le(b: torch.Tensor) -> torch.Tensor:
    """Little-endian bit string: (..., n) uint8 -> (..., 8n) uint8, bit k = (b[k//8] >> k%8) & 1."""
    return bit_fields(b, 1).transpose(-1, -2).reshape(*b.shape[:-1], -1)


def lookup(table: tuple[int, ...], idx: torch.Tensor) -> torch.Tensor:
    """Map integer indices through a small int table, giving float32 (exact for these tables)."""
    t = torch.tensor(table, dtype=torch.float32, device=idx.device)
    return t[idx.long()]


def rows_out(y: torch.Tensor, n_per_row: int) -> torch.Tensor:
    return y.reshape(-1, n_per_row)


# ---------------------------------------------------------------------------------------------
# codecs


class _LegacyCodec(Codec):
    def _blocks(self, data: torch.Tensor) -> torch.Tensor:
        return blocks(data, self.gtype.type_size)


@register
class Q4_0(_LegacyCodec):
    name = "q4_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 18)
        d = f16(b, 0)  # (rows, nb, 1)
        q = nibbles(b[..., 2:18]).float().sub_(8)  # (rows, nb, 32); in place from here (KV reads)
        return rows_out(q.mul_(d), n_per_row)


@register
class Q4_1(_LegacyCodec):
    name = "q4_1"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 20)
        d, m = f16(b, 0), f16(b, 2)  # (rows, nb, 1)
        q = nibbles(b[..., 4:20]).float()  # (rows, nb, 32)
        return rows_out(q.mul_(d).add_(m), n_per_row)


def _q5_quants(b: torch.Tensor, qh_off: int) -> torch.Tensor:
    """5-bit values 0..31 of a Q5_0/Q5_1 block: (rows, nb, size) -> (rows, nb, 32) int32."""
    qh = bits_le(b[..., qh_off : qh_off + 4])  # (rows, nb, 32) bit k -> weight k
    lo = nibbles(b[..., qh_off + 4 : qh_off + 20])  # (rows, nb, 32)
    return (lo | (qh << 4)).to(torch.int32)


@register
class Q5_0(_LegacyCodec):
    name = "q5_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 22)
        d = f16(b, 0)
        q = _q5_quants(b, 2).float().sub_(16)
        return rows_out(q.mul_(d), n_per_row)


@register
class Q5_1(_LegacyCodec):
    name = "q5_1"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 24)
        d, m = f16(b, 0), f16(b, 2)
        q = _q5_quants(b, 4).float()
        return rows_out(q.mul_(d).add_(m), n_per_row)


@register
class Q8_0(_LegacyCodec):
    name = "q8_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 34)
        d = f16(b, 0)
        q = b[..., 2:34].contiguous().view(torch.int8).float()  # (rows, nb, 32)
        return rows_out(q.mul_(d), n_per_row)  # in place: a KV read makes one float copy, not two


@register
class Q6_0(_LegacyCodec):
    name = "q6_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 26)
        d = f16(b, 0)
        # crumbs[k, i] = (qh[i] >> 2k) & 3; weights 0-7 use k=0, 8-15 k=2, 16-23 k=1, 24-31 k=3
        crumbs = bit_fields(b[..., 2:10], 2)  # (rows, nb, 4, 8)
        hi = crumbs[..., [0, 2, 1, 3], :].reshape(*b.shape[:-1], QK)  # (rows, nb, 32)
        lo = nibbles(b[..., 10:26])  # (rows, nb, 32)
        q = (lo | (hi << 4)).float().sub_(32)
        return rows_out(q.mul_(d), n_per_row)


@register
class IQ4_NL(_LegacyCodec):
    name = "iq4_nl"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 18)
        d = f16(b, 0)
        v = lookup(KVALUES_IQ4NL, nibbles(b[..., 2:18]))  # (rows, nb, 32)
        return rows_out(v.mul_(d), n_per_row)


# ---------------------------------------------------------------------------------------------
# encoders (ggml's reference quantizers, vectorised over blocks)
#
# ggml accumulates its per-block sums in a plain C loop, left to right in float32; `seq_dot` does the
# same (a loop over the 32 positions of a block, vectorised over all blocks), so candidate scales are
# compared on the same float values and near-ties resolve the same way.


def seq_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C `for (i...) acc += a[i]*b[i]` in float32, left to right: (..., n) -> (...)."""
    p = a * b
    acc = p[..., 0]
    for i in range(1, p.shape[-1]):
        acc = acc + p[..., i]
    return acc


def rint(v: torch.Tensor) -> torch.Tensor:
    """ggml `nearest_int` as a float: round half to even via the 1.5*2^23 trick (|v| < 2^22; larger
    values are returned as they are). Also far cheaper than torch.round on a busy multi-thread CPU."""
    r = (v + 12582912.0) - 12582912.0
    return torch.where(v.abs() < 4194304.0, r, v)


def round_away(v: torch.Tensor) -> torch.Tensor:
    """C `roundf`: round half away from zero (v - trunc(v) is exact in float32)."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, signed value at the first position of the largest |x|): (..., n) -> (...), (...)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)  # argmax returns the first maximal index
    v = x.gather(-1, idx).squeeze(-1)
    return v.abs(), v


def half_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (...) -> fp16 bytes (..., 2), round to nearest even (as F16C)."""
    return v.to(torch.float16).unsqueeze(-1).contiguous().view(torch.uint8)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) values 0..15 -> (..., 16) bytes: weight j low nibble, weight j+16 high nibble."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8n) bits 0/1 -> (..., n) bytes, bit k -> byte k//8, bit k%8 (inverse of `bits_le`)."""
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (b << shifts).sum(dim=-1, dtype=torch.uint8)


def fmaf(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b + c with one rounding, as a contracted C expression compiles to (exact product in float64).

    The reference build contracts a multiply-add written as one C expression (clang's
    -ffp-contract=on), never across statements.
    """
    return (a.double() * b.double() + c.double()).float()


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C `sqrtf`); torch's vectorised CPU float32 sqrt is not always."""
    return v.double().sqrt().float()


def importance(x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """ggml's legacy-type weights: qw * sqrt(sigma2 + x^2), sigma2 = mean(x^2) over the row.

    x (rows, nb, 32), imatrix (nb*32,) -> (rows, nb, 32). The row sum is a sequential float32 sum.
    """
    flat = x.reshape(x.shape[0], -1)
    sigma2 = seq_dot(flat, flat) / flat.shape[-1]  # (rows,)
    qw = imatrix.reshape(x.shape[1:])
    return qw * sqrt_f32(sigma2.view(-1, 1, 1) + x * x)


def make_qx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ik_llama.cpp `make_qx_quants` with weights: symmetric scale search, then greedy refinement.

    Levels l are in -nmax..nmax-1. Candidates: inverse scales -(nmax + 0.1*is)/max and its mirror
    (nmax - 1 + 0.1*is)/max for is = -9..9, ranked by (Σwxl)²/Σwl²; then single-level moves along the
    largest weighted gradient while they improve that ratio.
    x, w (..., n) -> scale (...), L (..., n) int32 = l + nmax.
    """
    amax, vmax = first_absmax(x)
    tiny = amax < 1e-15
    vmax = torch.where(tiny, torch.ones_like(vmax), vmax)
    wx = w * x

    def fit(iscale):
        lq = torch.clamp(rint(iscale.unsqueeze(-1) * x), -nmax, nmax - 1)
        return lq, seq_dot(wx, lq), seq_dot(w * lq, lq)

    lq, sumlx, suml2 = fit(-float(nmax) / vmax)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    tenth = torch.tensor(0.1, dtype=torch.float32)
    for step in range(-9, 10):
        for num in (-(nmax + tenth * step), nmax - 1 + tenth * step):
            cand, c_lx, c_l2 = fit(num / vmax)
            better = (c_l2 > 0) & (c_lx * c_lx > best * c_l2)
            lq = torch.where(better.unsqueeze(-1), cand, lq)
            sumlx = torch.where(better, c_lx, sumlx)
            suml2 = torch.where(better, c_l2, suml2)
            scale = torch.where(better, c_lx / c_l2, scale)
            best = torch.where(better, scale * sumlx, best)

    active = ~tiny
    for _ in range(x.shape[-1] * (2 * nmax - 1)):
        if not bool(active.any()):
            break
        s = scale.unsqueeze(-1)
        g = (s * w) * (x - s * lq)
        movable = ((g > 0) & (lq < nmax - 1)) | ((g < 0) & (lq > -nmax))
        ag = torch.where(movable, g.abs(), torch.full_like(g, -1.0))
        j = ag.argmax(dim=-1, keepdim=True)  # first index of the largest |g|
        found = movable.any(dim=-1)
        up = g.gather(-1, j).squeeze(-1) > 0
        wj, xj, lj = w.gather(-1, j).squeeze(-1), x.gather(-1, j).squeeze(-1), lq.gather(-1, j).squeeze(-1)
        wxj = wj * xj
        new_lx = torch.where(up, sumlx + wxj, sumlx - wxj)
        new_l2 = torch.where(up, suml2 + wj * (2 * lj + 1), suml2 - wj * (2 * lj - 1))
        accept = active & found & (new_l2 > 0) & (new_lx * new_lx > best * new_l2)
        sumlx = torch.where(accept, new_lx, sumlx)
        suml2 = torch.where(accept, new_l2, suml2)
        scale = torch.where(accept, sumlx / suml2, scale)
        best = torch.where(accept, scale * sumlx, best)
        moved = lq.gather(-1, j) + torch.where(up, 1.0, -1.0).unsqueeze(-1)
        lq = torch.where(accept.unsqueeze(-1), lq.scatter(-1, j, moved), lq)
        active = accept

    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    L = torch.where(tiny.unsqueeze(-1), torch.zeros_like(lq), lq + nmax)
    return scale, L.to(torch.int32)


def make_qkx3_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float = -0.9,
    rdelta: float = 0.05,
    nstep: int = 36,
    track_min: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ik_llama.cpp `make_qkx3_quants` (squared error): affine fit y = scale*L + min, min <= 0.

    Sums are float64 as in the C code; scale and min are kept as float32. After a scan of nstep+1
    inverse scales, single levels move along the largest residual while the weighted fit improves.
    x, w (..., n) -> scale (...), the_min (...) (= -min, so y = scale*L - the_min), L (..., n) int32.
    """
    mn = torch.clamp(x.amin(dim=-1), max=0.0)  # (...) float32
    mx = x.amax(dim=-1)
    flat = (mx - mn) < 1e-10
    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    wd, xd = w.double(), x.double()
    sum_w, sum_x, sum_x2 = seq_dot(wd, torch.ones_like(wd)), seq_dot(wd, xd), seq_dot(wd * xd, xd)

    mn0 = mn

    def levels(iscale, base):
        return torch.clamp(rint(iscale.unsqueeze(-1) * (x - base.unsqueeze(-1))), 0, nmax)

    def sums(lq):
        ld = lq.double()
        return seq_dot(wd, ld), seq_dot(wd * ld, ld), seq_dot(wd * ld, xd)

    def fit(s_l, s_l2, s_xl):
        D = sum_w * s_l2 - s_l * s_l
        Ds = torch.where(D > 0, D, torch.ones_like(D))
        sc = (sum_w * s_xl - sum_x * s_l) / Ds
        m = (s_l2 * sum_x - s_l * s_xl) / Ds
        pos = m > 0
        return D > 0, torch.where(pos, s_xl / s_l2, sc), torch.where(pos, torch.zeros_like(m), m)

    def score(sc, m, s_l, s_l2, s_xl):  # Σw x² - weighted squared error
        return 2 * sc * s_xl + 2 * m * sum_x - 2 * sc * m * s_l - sc * sc * s_l2 - m * m * sum_w

    iscale = nmax / span
    scale = 1 / iscale
    L = levels(iscale, mn)
    diff = scale.double().unsqueeze(-1) * L.double() + mn.double().unsqueeze(-1) - xd
    best_mad = seq_dot(wd, diff * diff)
    r0, r1 = torch.tensor(rmin, dtype=torch.float32), torch.tensor(rdelta, dtype=torch.float32)
    for step in range(nstep + 1):
        # ggml moves the offset (and the span) with the best fit so far; track_min=False keeps the first
        base = mn if track_min else mn0
        lq = levels((fmaf(r1, torch.tensor(float(step)), r0) + nmax) / (mx - base), base)
        s_l, s_l2, s_xl = sums(lq)
        ok, sc, m = fit(s_l, s_l2, s_xl)
        mad = sum_x2 - 2 * sc * s_xl - 2 * m * sum_x + 2 * sc * m * s_l + sc * sc * s_l2 + m * m * sum_w
        better = ok & (mad < best_mad)
        L = torch.where(better.unsqueeze(-1), lq, L)
        best_mad = torch.where(better, mad, best_mad)
        scale = torch.where(better, sc.float(), scale)
        mn = torch.where(better, m.float(), mn)

    s_l, s_l2, s_xl = sums(L)
    best = score(scale.double(), mn.double(), s_l, s_l2, s_xl)
    last_j = torch.full_like(mn, -1, dtype=torch.int64)
    last_dir = torch.zeros_like(last_j)
    active = ~flat
    for _ in range(nmax * x.shape[-1]):
        if not bool(active.any()):
            break
        g = x - scale.unsqueeze(-1) * L - mn.unsqueeze(-1)
        eligible = ((g > 0) & (L < nmax)) | ((g < 0) & (L > 0))
        j = torch.where(eligible, g.abs(), torch.full_like(g, -1.0)).argmax(dim=-1, keepdim=True)
        direction = torch.where(g.gather(-1, j).squeeze(-1) > 0, 1, -1)
        jj = j.squeeze(-1)
        go = active & eligible.any(dim=-1) & ~((jj == last_j) & (direction == -last_dir))
        wj, xj = wd.gather(-1, j).squeeze(-1), xd.gather(-1, j).squeeze(-1)
        lj = L.gather(-1, j).squeeze(-1).to(torch.int64)
        n_l = s_l + wj * direction
        n_l2 = s_l2 + wj * (2 * lj * direction + 1)
        n_xl = s_xl + wj * xj * direction
        ok, sc, m = fit(n_l, n_l2, n_xl)
        new = score(sc, m, n_l, n_l2, n_xl)
        accept = go & ok & (sc >= 0) & (new > best)
        s_l, s_l2, s_xl = (torch.where(accept, a, b) for a, b in ((n_l, s_l), (n_l2, s_l2), (n_xl, s_xl)))
        best = torch.where(accept, new, best)
        scale = torch.where(accept, sc.float(), scale)
        mn = torch.where(accept, m.float(), mn)
        L = torch.where(accept.unsqueeze(-1), L.scatter(-1, j, (lj + direction).unsqueeze(-1).float()), L)
        last_j = torch.where(accept, jj, last_j)
        last_dir = torch.where(accept, direction, last_dir)
        active = accept

    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat.unsqueeze(-1), torch.zeros_like(L), L)
    return scale, -mn, L.to(torch.int32)


def best_index(grid: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Nearest grid index, exact ties to the higher index (ggml `best_index_int8`): -> int64 like v.

    `grid` holds sorted integers in -128..127: the grid values <= v are those <= floor(v), so a
    256-entry table of counts gives the bracketing pair without a search.
    """
    n = grid.numel()
    ints = torch.arange(-128, 128, dtype=grid.dtype, device=grid.device)
    below = (grid.view(1, -1) <= ints.view(-1, 1)).sum(-1)  # count of grid values <= k
    k = torch.floor(v).clamp(-128, 127).to(torch.int64) + 128
    hi = below[k].clamp(1, n - 1)  # g[hi-1] <= v < g[hi] inside the grid's range
    lo = hi - 1
    pick_lo = (v - grid[lo]) < (grid[hi] - v)
    idx = torch.where(pick_lo, lo, hi)
    idx = torch.where(v <= grid[0], torch.zeros_like(idx), idx)
    return torch.where(v >= grid[-1], torch.full_like(idx, n - 1), idx)


def _split(x: torch.Tensor) -> torch.Tensor:
    """(rows, n) -> (rows, nb, 32)."""
    return x.reshape(x.shape[0], -1, QK)


def _assemble(*fields: torch.Tensor) -> torch.Tensor:
    """Concatenate per-block byte fields (rows, nb, k_i) into rows (rows, nb * sum k_i)."""
    b = torch.cat([f.to(torch.uint8) for f in fields], dim=-1)
    return b.reshape(b.shape[0], -1)


def _q8_0_encode(x: torch.Tensor) -> torch.Tensor:
    xb = _split(x)  # (rows, nb, 32)
    amax = xb.abs().amax(dim=-1)  # (rows, nb)
    d = amax / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = round_away(xb * inv.unsqueeze(-1)).to(torch.int8)
    return _assemble(half_bytes(d), q.view(torch.uint8))


def _sym_ref(xb: torch.Tensor, nlev: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q4_0_ref / q5_0_ref: d = max / -nlev/2, q = min(nlev-1, trunc(x/d + nlev/2 + 0.5))."""
    half = nlev // 2
    _, vmax = first_absmax(xb)
    d = vmax / -half
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(xb * inv.unsqueeze(-1) + (half + 0.5)), max=nlev - 1)
    return d, q.to(torch.int32)


def _affine_ref(xb: torch.Tensor, nlev: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/(nlev-1), q = trunc((x - min)/d + 0.5)."""
    mn, mx = xb.amin(dim=-1), xb.amax(dim=-1)
    d = (mx - mn) / (nlev - 1)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc((xb - mn.unsqueeze(-1)) * inv.unsqueeze(-1) + 0.5), max=nlev - 1)
    return d, mn, q.to(torch.int32)


def _q4_0_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    xb = _split(x)
    if imatrix is None:
        d, q = _sym_ref(xb, 16)
    else:
        d, q = make_qx_quants(xb, importance(xb, imatrix), 8)
    return _assemble(half_bytes(d), pack_nibbles(q))


def _q5_0_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    xb = _split(x)
    if imatrix is None:
        d, q = _sym_ref(xb, 32)
    else:
        d, q = make_qx_quants(xb, importance(xb, imatrix), 16)
    return _assemble(half_bytes(d), pack_bits(q >> 4), pack_nibbles(q & 15))


def _affine_encode(x: torch.Tensor, imatrix: torch.Tensor | None, nlev: int) -> torch.Tensor:
    """Q4_1 / Q5_1: (d, m, q) with y = d*q + m."""
    xb = _split(x)
    if imatrix is None:
        d, m, q = _affine_ref(xb, nlev)
    else:
        # ggml's search, and the same search with the offset held fixed: keep the better block
        w = importance(xb, imatrix)
        fits = [make_qkx3_quants(xb, w, nlev - 1, track_min=t) for t in (True, False)]
        d, m, q = _best_affine(xb, w, [(d, -mn, q) for d, mn, q in fits])
    if nlev == 16:
        return _assemble(half_bytes(d), half_bytes(m), pack_nibbles(q))
    return _assemble(half_bytes(d), half_bytes(m), pack_bits(q >> 4), pack_nibbles(q & 15))


def _best_affine(xb, w, cands):
    """Per block, the (d, m, q) candidate whose fp16-rounded reconstruction d*q + m has the least
    w-weighted squared error (the first on ties)."""
    best = None
    for d, m, q in cands:
        y = d.half().float().unsqueeze(-1) * q.float() + m.half().float().unsqueeze(-1)
        err = ((y - xb).double() ** 2 * w.double()).sum(-1)
        if best is None:
            best = (err, d, m, q)
            continue
        take = err < best[0]
        best = (
            torch.where(take, err, best[0]),
            torch.where(take, d, best[1]),
            torch.where(take, m, best[2]),
            torch.where(take.unsqueeze(-1), q, best[3]),
        )
    return best[1], best[2], best[3]


def _q6_0_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """ik_llama.cpp quantize_q6_0: make_qx_quants(nmax=32) with weights x^2, or the legacy imatrix weights."""
    xb = _split(x)
    w = xb * xb if imatrix is None else importance(xb, imatrix)
    d, q = make_qx_quants(xb, w, 32)  # q in 0..63
    # qh[j%8] gets (q[j]>>4 | (q[j+16]>>4)<<2) << 4*(j//8) for j < 16
    h = (q[..., :16] >> 4) | ((q[..., 16:] >> 4) << 2)  # (rows, nb, 16)
    qh = h[..., :8] | (h[..., 8:] << 4)
    return _assemble(half_bytes(d), qh, pack_nibbles(q & 15))


def iq4_block_fit(xb: torch.Tensor, w: torch.Tensor, ntry: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale search of ik_llama.cpp `quantize_row_iq4_nl_impl` on a grid of 16 values.

    Start at d = max/127 and refit d = Σwqx/Σwq²; try inverse scales (itry + v[0])/max and the mirror
    (itry + v[15])/max for itry in -ntry..ntry, keeping the best (Σwqx)²/Σwq²; then move single
    indices one grid step (the one reaching its step soonest along the gradient) while that improves.
    xb, w (..., 32) -> d (...), L (..., 32) int64 grid indices.
    """
    grid = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=xb.device)
    amax, vmax = first_absmax(xb)
    tiny = amax < 1e-15
    vmax = torch.where(tiny, torch.ones_like(vmax), vmax)

    def fit(inv):
        idx = best_index(grid, inv.unsqueeze(-1) * xb)
        q = grid[idx]
        return idx, seq_dot(w * q, xb), seq_dot(w * q, q)

    L, sumqx, sumq2 = fit(1 / (-vmax / grid[0]))
    d = sumqx / sumq2
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        for edge in (grid[0], grid[15]):
            cand, c_qx, c_q2 = fit((itry + edge) / vmax)
            better = (c_q2 > 0) & (c_qx * c_qx > best * c_q2)
            L = torch.where(better.unsqueeze(-1), cand, L)
            sumqx = torch.where(better, c_qx, sumqx)
            sumq2 = torch.where(better, c_q2, sumq2)
            d = torch.where(better, c_qx / c_q2, d)
            best = torch.where(better, d * sumqx, best)

    active = ~tiny
    inf = torch.tensor(float("inf"), device=xb.device)
    for _ in range(32 * xb.shape[-1]):
        if not bool(active.any()):
            break
        dd = d.unsqueeze(-1)
        v = grid[L]
        g = (dd * w) * (xb - dd * v)
        up_ok = (g > 0) & (L < 15)
        dn_ok = (g < 0) & (L > 0)
        step_up = (grid[(L + 1).clamp(max=15)] - v) / g
        step_dn = (grid[(L - 1).clamp(min=0)] - v) / g
        step = torch.where(up_ok, step_up, torch.where(dn_ok, step_dn, inf))
        eligible = (up_ok | dn_ok) & (step < inf)
        step = torch.where(eligible, step, inf)
        j = step.argmin(dim=-1, keepdim=True)  # first index of the smallest step
        found = eligible.any(dim=-1)
        direction = torch.where(up_ok.gather(-1, j), 1, -1)
        lj = L.gather(-1, j)
        v_old, v_new = grid[lj].squeeze(-1), grid[(lj + direction).clamp(0, 15)].squeeze(-1)
        wj, xj = w.gather(-1, j).squeeze(-1), xb.gather(-1, j).squeeze(-1)
        new_qx = sumqx + (wj * xj) * (v_new - v_old)
        new_q2 = sumq2 + wj * (v_new * v_new - v_old * v_old)
        accept = active & found & (new_q2 > 0) & (new_qx * new_qx > best * new_q2)
        sumqx = torch.where(accept, new_qx, sumqx)
        sumq2 = torch.where(accept, new_q2, sumq2)
        d = torch.where(accept, sumqx / sumq2, d)
        best = torch.where(accept, d * sumqx, best)
        L = torch.where(accept.unsqueeze(-1), L.scatter(-1, j, (lj + direction).clamp(0, 15)), L)
        active = accept
    return torch.where(tiny, torch.zeros_like(d), d), L


def _iq4_nl_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    xb = _split(x)  # (rows, nb, 32)
    if imatrix is None:
        w = xb * xb
    else:  # sigma2 = 2 * mean(x^2) over the (32-weight) super-block
        sigma2 = seq_dot(xb, xb) * (2.0 / QK)
        w = imatrix.reshape(xb.shape[1:]) * sqrt_f32(sigma2.unsqueeze(-1) + xb * xb)
    d, _ = iq4_block_fit(xb, w)
    grid = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=xb.device)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = best_index(grid, inv.unsqueeze(-1) * xb)
    return _assemble(half_bytes(d), pack_nibbles(q))


Q8_0.encode = lambda self, x, imatrix=None: _q8_0_encode(x)  # noqa: E731  (Q8_0 ignores the imatrix)
Q4_0.encode = lambda self, x, imatrix=None: _q4_0_encode(x, imatrix)  # noqa: E731
Q5_0.encode = lambda self, x, imatrix=None: _q5_0_encode(x, imatrix)  # noqa: E731
Q4_1.encode = lambda self, x, imatrix=None: _affine_encode(x, imatrix, 16)  # noqa: E731
Q5_1.encode = lambda self, x, imatrix=None: _affine_encode(x, imatrix, 32)  # noqa: E731
Q6_0.encode = lambda self, x, imatrix=None: _q6_0_encode(x, imatrix)  # noqa: E731
IQ4_NL.encode = lambda self, x, imatrix=None: _iq4_nl_encode(x, imatrix)  # noqa: E731
