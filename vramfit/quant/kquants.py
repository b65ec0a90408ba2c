"""K-quants: 256-weight super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

Block layouts (ggml `block_q*_K`, little-endian, QK_K = 256):

    Q2_K  84 B: scales[16] | qs[64] | d fp16 | dmin fp16
          16 sub-blocks of 16; scales[i] = scale (low nibble) | min (high nibble)
          y = (d * sc) * q - (dmin * m),  q 2-bit
    Q3_K 110 B: hmask[32] | qs[64] | scales[12] | d fp16
          16 sub-blocks of 16; 6-bit scales (packed, see `_q3_scales`), minus 32
          y = (d * (sc - 32)) * (q - (high bit ? 0 : 4)),  q 2-bit + inverted high bit
    Q4_K 144 B: d fp16 | dmin fp16 | scales[12] | qs[128]
          8 sub-blocks of 32; 6-bit scale and min packed in 12 bytes (`_k4_scales_mins`)
          y = (d * sc) * q - (dmin * m),  q 4-bit
    Q5_K 176 B: d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]
          as Q4_K with a fifth bit from qh
    Q6_K 210 B: ql[128] | qh[64] | scales int8[16] | d fp16
          16 sub-blocks of 16; y = (d * sc) * (q - 32),  q 6-bit

Bit placement, for the 2-bit fields of Q2_K/Q3_K: each 128-weight half uses 32 bytes of qs; weight
32*j + l of that half is (qs[l] >> 2j) & 3. For Q4_K/Q5_K each 64-weight chunk uses 32 bytes of qs:
low nibbles give its first 32 weights, high nibbles the next 32. The extra high bits (Q3_K hmask,
Q5_K qh) are bit-planes: weight 32*k + l takes bit k of byte l. Q6_K: each 128-weight half uses 64
bytes of ql (low nibbles -> weights 0..63, high nibbles -> 64..127) and 32 bytes of qh (bits 2k..2k+1
of qh[l] -> weight 32*k + l).

The float operation order matches ggml's `dequantize_row_q*_K` exactly (sub-block scale first, then
times the quant, then minus the min), which is what makes the output bit-exact.
"""

from __future__ import annotations

import torch

from vramfit.quant.legacy import (
    bit_fields,
    blocks,
    f16,
    first_absmax,
    half_bytes,
    make_qkx3_quants,
    make_qx_quants,
    nibbles,
    rint,
    rows_out,
    seq_dot,
    sqrt_f32,
)
from vramfit.quant.registry import Codec, register

QK_K = 256


def _per16(s: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sub-block values (rows, nb, 256/g) to weights (rows, nb, 256)."""
    return s.repeat_interleave(QK_K // s.shape[-1], dim=-1)


def _crumbs_128(qs: torch.Tensor) -> torch.Tensor:
    """2-bit fields of Q2_K/Q3_K: qs (rows, nb, 64) -> (rows, nb, 256) uint8 in weight order."""
    halves = qs.reshape(*qs.shape[:-1], 2, 32)  # (rows, nb, half, l)
    return bit_fields(halves, 2).reshape(*qs.shape[:-1], QK_K)  # (rows, nb, half, j, l) -> 256


def _k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml `get_scale_min_k4` for all 8 sub-blocks: scales[12] -> (sc, m), each (rows, nb, 8) uint8.

    j < 4:  sc = s[j] & 63,                          m = s[j+4] & 63
    j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,  m = (s[j+4] >> 4) | (s[j] >> 6) << 4
    """
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc, m


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 six-bit scales from scales[12]: (rows, nb, 12) uint8 -> (rows, nb, 16) int32 (minus 32).

    low 4 bits of scale k: s[k] & 15 for k < 8, s[k-8] >> 4 for k >= 8
    high 2 bits of scale k: (s[8 + k%4] >> 2*(k//4)) & 3
    """
    low = nibbles(s[..., 0:8])  # (rows, nb, 16)
    high = bit_fields(s[..., 8:12], 2).reshape(*s.shape[:-1], 16)  # (rows, nb, k//4, k%4) -> 16
    return (low | (high << 4)).to(torch.int32) - 32


class _KCodec(Codec):
    def _blocks(self, data: torch.Tensor) -> torch.Tensor:
        return blocks(data, self.gtype.type_size)


@register
class Q2_K(_KCodec):
    name = "q2_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 84)
        sc = b[..., 0:16]  # (rows, nb, 16)
        q = _crumbs_128(b[..., 16:80]).float()  # (rows, nb, 256)
        d, dmin = f16(b, 80), f16(b, 82)  # (rows, nb, 1)
        dl = d * (sc & 15).float()  # (rows, nb, 16)
        ml = dmin * (sc >> 4).float()
        return rows_out(_per16(dl) * q - _per16(ml), n_per_row)


@register
class Q3_K(_KCodec):
    name = "q3_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 110)
        # hmask is a bit-plane: weight 32*k + l takes bit k of hmask[l]
        hbit = bit_fields(b[..., 0:32], 1).reshape(*b.shape[:-1], QK_K)  # (rows, nb, k, l) -> 256
        low = _crumbs_128(b[..., 32:96])  # (rows, nb, 256)
        q = low.to(torch.int32) - 4 + 4 * hbit.to(torch.int32)  # (rows, nb, 256) in -4..3
        d = f16(b, 108)  # (rows, nb, 1)
        dl = d * _q3_scales(b[..., 96:108]).float()  # (rows, nb, 16)
        return rows_out(_per16(dl) * q.float(), n_per_row)


def _k4_dm(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32 scale and min of Q4_K/Q5_K: (rows, nb, 8) float32 each, as d*sc and dmin*m."""
    d, dmin = f16(b, 0), f16(b, 2)  # (rows, nb, 1)
    sc, m = _k4_scales_mins(b[..., 4:16])  # (rows, nb, 8)
    return d * sc.float(), dmin * m.float()


def _k4_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low 4 bits: qs (rows, nb, 128) -> (rows, nb, 256): per 32 bytes, low then high nibbles."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)  # (rows, nb, chunk, l)
    return nibbles(chunks).reshape(*qs.shape[:-1], QK_K)


@register
class Q4_K(_KCodec):
    name = "q4_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 144)
        d1, m1 = _k4_dm(b)  # (rows, nb, 8)
        q = _k4_nibbles(b[..., 16:144]).float()  # (rows, nb, 256)
        return rows_out(_per16(d1) * q - _per16(m1), n_per_row)


@register
class Q5_K(_KCodec):
    name = "q5_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 176)
        d1, m1 = _k4_dm(b)  # (rows, nb, 8)
        # qh is a bit-plane: weight 32*k + l takes bit k of qh[l]
        hbit = bit_fields(b[..., 16:48], 1).reshape(*b.shape[:-1], QK_K)  # (rows, nb, 256)
        q = (_k4_nibbles(b[..., 48:176]) | (hbit << 4)).float()
        return rows_out(_per16(d1) * q - _per16(m1), n_per_row)


@register
class Q6_K(_KCodec):
    name = "q6_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 210)
        lead = b.shape[:-1]
        ql = nibbles(b[..., 0:128].reshape(*lead, 2, 64))  # (rows, nb, half, 128)
        qh = bit_fields(b[..., 128:192].reshape(*lead, 2, 32), 2)  # (rows, nb, half, k, l)
        q = (ql | (qh.reshape(*lead, 2, 128) << 4)).to(torch.int32) - 32
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # (rows, nb, 16)
        d = f16(b, 208)  # (rows, nb, 1)
        dl = d * sc  # (rows, nb, 16)
        return rows_out(_per16(dl) * q.reshape(*lead, QK_K).float(), n_per_row)


# ---------------------------------------------------------------------------------------------
# encoders: ggml's quantize_row_q*_K_ref (no imatrix) and ik_llama.cpp's quantize_row_q*_K_impl
# (with one), vectorised over rows and super-blocks; per-block sums run in ggml's float32 order.
# Each result is then compared, per super-block, with a least-squares refit of the super-block
# scales (`_refit`), and the one with the smaller error is kept.


def _sub(x: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n_per_row) -> (rows, nsb, 256/n, n)."""
    return x.reshape(x.shape[0], -1, QK_K // n, n)


def _sigma2(xs: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * Σx²/256 per super-block (sequential float32 sum): (rows, nsb, 256) -> (rows, nsb, 1, 1)."""
    return (factor * seq_dot(xs, xs) / QK_K).view(*xs.shape[:-1], 1, 1)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """ggml `make_qkx2_quants`: affine fit y = scale*L + min (min <= 0), float32 sums.

    Scans nstep+1 inverse scales (rmin + rdelta*is + nmax)/(max - min), with the offset and span
    following the best fit so far, scoring weighted |error| (use_mad) or squared error.
    x, w (..., n) -> scale (...), the_min (...) (= -min), L (..., n) float in 0..nmax.
    """
    mn = torch.clamp(x.amin(dim=-1), max=0.0)
    mx = x.amax(dim=-1)
    flat = (mx - mn) < 1e-10
    sum_w, sum_x = seq_dot(w, torch.ones_like(w)), seq_dot(w, x)

    def levels(iscale, base):
        return torch.clamp(rint(iscale.unsqueeze(-1) * (x - base.unsqueeze(-1))), 0, nmax)

    def loss(sc, m, lq):
        diff = sc.unsqueeze(-1) * lq + m.unsqueeze(-1) - x
        return seq_dot(w, diff.abs() if use_mad else diff * diff)

    span = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / span
    scale = 1 / iscale
    L = levels(iscale, mn)
    best = loss(scale, mn, L)
    for step in range(nstep + 1):
        lq = levels((rmin + rdelta * step + nmax) / torch.where(flat, span, mx - mn), mn)
        s_l, s_l2, s_xl = seq_dot(w, lq), seq_dot(w * lq, lq), seq_dot(w * lq, x)
        D = sum_w * s_l2 - s_l * s_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        sc = (sum_w * s_xl - sum_x * s_l) / Ds
        m = (s_l2 * sum_x - s_l * s_xl) / Ds
        pos = m > 0
        sc = torch.where(pos, s_xl / torch.where(s_l2 > 0, s_l2, torch.ones_like(s_l2)), sc)
        m = torch.where(pos, torch.zeros_like(m), m)
        mad = loss(sc, m, lq)
        better = ok & (mad < best) & ~flat
        L = torch.where(better.unsqueeze(-1), lq, L)
        best = torch.where(better, mad, best)
        scale = torch.where(better, sc, scale)
        mn = torch.where(better, m, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat.unsqueeze(-1), torch.zeros_like(L), L)
    return scale, -mn, L


def make_qp_quants(x, w, nmax):
    """ggml `make_qp_quants`: a positive scale for positive values x (..., n) on 0..nmax.

    Tries inverse scales (nmax + 0.1*is)/max, is = -4..4, by weighted squared error, then up to 5
    rounds of single-value moves that raise (Σwxl)²/Σwl². -> scale (...), L (..., n) float.
    """
    mx = torch.clamp(x.amax(dim=-1), min=0.0)
    tiny = mx < 1e-16
    mxs = torch.where(tiny, torch.ones_like(mx), mx)
    iscale = nmax / mxs
    L0 = rint(iscale.unsqueeze(-1) * x)
    diff = x - (1 / iscale).unsqueeze(-1) * L0
    best = seq_dot(w * diff, diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (0.1 * step + nmax) / mxs
        lq = torch.clamp(rint(isc.unsqueeze(-1) * x), max=nmax)
        diff = x - (1 / isc).unsqueeze(-1) * lq
        mse = seq_dot(w * diff, diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    L = torch.clamp(rint(iscale.unsqueeze(-1) * x), 0, nmax)
    sumlx, suml2 = seq_dot(w * x, L), seq_dot(w * L, L)
    for _ in range(5):
        changed = torch.zeros_like(tiny)
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            okk = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp(rint(xi * sl2 / torch.where(okk, slx, torch.ones_like(slx))), 0, nmax)
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            acc = okk & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = torch.where(acc, new_l, li)
            sumlx = torch.where(acc, slx, sumlx)
            suml2 = torch.where(acc, sl2, suml2)
            changed = changed | acc
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0.0)
    scale = torch.where(tiny, torch.zeros_like(scale), scale)
    return scale, torch.where(tiny.unsqueeze(-1), torch.zeros_like(L), L)


def make_q3_quants(x, nmax):
    """ggml `make_q3_quants` with do_rmse: weights x², start at -nmax/max, then up to 5 rounds of
    coordinate moves that raise (Σwxl)²/Σwl². x (..., n) -> scale (...), L (..., n) float 0..2nmax-1."""
    amax, vmax = first_absmax(x)
    tiny = amax < 1e-15
    vmax = torch.where(tiny, torch.ones_like(vmax), vmax)
    L = torch.clamp(rint((-nmax / vmax).unsqueeze(-1) * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = seq_dot(w * x, L), seq_dot(w * L, L)
    for _ in range(5):
        changed = torch.zeros_like(tiny)
        for i in range(x.shape[-1]):
            wi, xi, li = w[..., i], x[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            okk = slx > 0
            new_l = torch.clamp(rint(xi * sl2 / torch.where(okk, slx, torch.ones_like(slx))), -nmax, nmax - 1)
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            acc = okk & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[..., i] = torch.where(acc, new_l, li)
            sumlx = torch.where(acc, slx, sumlx)
            suml2 = torch.where(acc, sl2, suml2)
            changed = changed | acc
        if not bool(changed.any()):
            break
    scale = torch.where(tiny | (suml2 == 0), torch.zeros_like(sumlx), sumlx / suml2)
    L = torch.where(tiny.unsqueeze(-1), torch.zeros_like(L), L + nmax)
    return scale, L


def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).float()


def _quantize_levels(x, d, m, lo, hi, L_keep):
    """L = clamp(nearest((x + m)/d), lo, hi) where d != 0, else L_keep (ggml: `if (!d) continue`).

    x (rows, nsb, ns, n); d, m (rows, nsb, ns)."""
    nz = d != 0
    ds = torch.where(nz, d, torch.ones_like(d)).unsqueeze(-1)
    L = torch.clamp(rint((x + m.unsqueeze(-1)) / ds), lo, hi)
    return torch.where(nz.unsqueeze(-1), L, L_keep)


def _refit(x, W, ls, lm, L, lo, hi, dh, mh, rounds=2):
    """Weighted least-squares refit of the fp16 super-block scale (and min scale) for fixed integer
    sub-block scales ls (and mins lm): y = (d*ls)*L - (dmin*lm). Requantizes L after each refit.

    x, W, L (rows, nsb, ns, n); ls, lm (rows, nsb, ns) float (lm None: no min); dh, mh fp16-valued.
    Returns candidates (d, dmin, L) of the last round.
    """
    xf, Wf = x.double(), W.double()
    for _ in range(rounds):
        a = (ls.unsqueeze(-1) * L).double()  # coefficient of d
        if lm is None:
            saa = (Wf * a * a).sum((-1, -2))
            sax = (Wf * a * xf).sum((-1, -2))
            ok = saa > 0
            d_new = torch.where(ok, sax / torch.where(ok, saa, torch.ones_like(saa)), dh.double())
            dh = _fp16(d_new.float())
        else:
            b = -lm.unsqueeze(-1).double().expand_as(a)
            saa, sbb, sab = (Wf * a * a).sum((-1, -2)), (Wf * b * b).sum((-1, -2)), (Wf * a * b).sum((-1, -2))
            sax, sbx = (Wf * a * xf).sum((-1, -2)), (Wf * b * xf).sum((-1, -2))
            det = saa * sbb - sab * sab
            ok = det > 1e-30 * (saa * sbb).clamp(min=1e-300)
            dets = torch.where(ok, det, torch.ones_like(det))
            d_new = torch.where(ok, (sax * sbb - sbx * sab) / dets, dh.double())
            m_new = torch.where(ok, (saa * sbx - sab * sax) / dets, mh.double())
            ok2 = ok & (d_new >= 0) & (m_new >= 0)
            dh = torch.where(ok2, _fp16(d_new.float()), dh)
            mh = torch.where(ok2, _fp16(m_new.float()), mh)
        dl = dh.unsqueeze(-1) * ls
        ml = mh.unsqueeze(-1) * lm if lm is not None else torch.zeros_like(dl)
        L = _quantize_levels(x, dl, ml, lo, hi, L)
    return dh, mh, L


def _sb_error(x, W, dh, mh, ls, lm, L):
    """Σ W (y - x)² per super-block for the decoded value y = (d*ls)*L - (dmin*lm)."""
    dl = dh.unsqueeze(-1) * ls
    y = dl.unsqueeze(-1) * L
    if lm is not None:
        y = y - (mh.unsqueeze(-1) * lm).unsqueeze(-1)
    return (W.double() * (y.double() - x.double()) ** 2).sum((-1, -2))


def _pick(err_a, err_b, a, b):
    """Per super-block: tensors of candidate b where err_b < err_a, else those of a."""
    take = err_b < err_a
    out = []
    for ta, tb in zip(a, b, strict=True):
        if ta is None:
            out.append(None)
            continue
        t = take.view(*take.shape, *([1] * (ta.dim() - take.dim())))
        out.append(torch.where(t, tb, ta))
    return out


def _metric_weights(x: torch.Tensor, imatrix: torch.Tensor | None, n: int) -> torch.Tensor:
    """Error weights used to choose between candidates: the imatrix, or x² without one."""
    xs = _sub(x, n)
    if imatrix is None:
        return xs * xs
    return imatrix.reshape(1, xs.shape[1], xs.shape[2], n).expand_as(xs)


# False: emit ggml's result unchanged (reference-algorithm bytes, for diagnostics and tests)
REFIT = True


def _improve(x, imatrix, n, dh, mh, ls, lm, L, lo, hi):
    """Keep, per super-block, the better of the ggml result and its least-squares refit."""
    if not REFIT:
        return dh, mh, L
    xs = _sub(x, n)
    W = _metric_weights(x, imatrix, n)
    e0 = _sb_error(xs, W, dh, mh, ls, lm, L)
    d1, m1, L1 = _refit(xs, W, ls, lm, L, lo, hi, dh, mh)
    e1 = _sb_error(xs, W, d1, m1, ls, lm, L1)
    dh, mh, L = _pick(e0, e1, (dh, mh, L), (d1, m1, L1))
    return dh, mh, L


def _pack_crumbs(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K 2-bit fields: (rows, nsb, 256) values 0..3 -> (rows, nsb, 64) bytes."""
    q = L.to(torch.uint8).reshape(*L.shape[:-1], 2, 4, 32)  # (half, j, l): weight 128h + 32j + l
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=L.device).view(4, 1)
    return (q << shifts).sum(-2, dtype=torch.uint8).reshape(*L.shape[:-1], 64)


def _bitplane(bits: torch.Tensor) -> torch.Tensor:
    """(rows, nsb, 256) 0/1 -> (rows, nsb, 32): weight 32k + l -> bit k of byte l."""
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], 8, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device).view(8, 1)
    return (b << shifts).sum(-2, dtype=torch.uint8)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """6-bit scales and mins (rows, nsb, 8) -> the 12 packed bytes of Q4_K/Q5_K."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    a = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
    b = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
    c = (ls[..., 4:] & 15) | ((lm[..., 4:] & 15) << 4)
    return torch.cat([a, b, c], dim=-1)


def _pack_k4_quants(L: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low nibbles: (rows, nsb, 256) -> (rows, nsb, 128)."""
    q = L.to(torch.uint8).reshape(*L.shape[:-1], 4, 2, 32) & 15
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*L.shape[:-1], 128)


def _trinet(x: torch.Tensor) -> bool:
    """ggml's q2_K ternary-net check over the whole input: values near {-max, 0, max} only."""
    xd = x.double()
    mx = xd.abs().max()
    lvl = torch.where(xd < -0.5 * mx, -1.0, torch.where(xd < 0.5 * mx, 0.0, 1.0)).double()
    mse0 = (xd * xd).sum()
    mse = ((xd - mx * lvl) ** 2).sum()
    return bool(mse < 0.1 * mse0)


def _q2_k_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    xb = _sub(x, 16)  # (rows, nsb, 16, 16)
    rows, nsb = xb.shape[:2]
    if imatrix is None and _trinet(x):
        mx = x.abs().max().reshape(1, 1).expand(rows, nsb)
        L = torch.where(
            xb < -0.5 * mx.view(rows, nsb, 1, 1), 0, torch.where(xb < 0.5 * mx.view(rows, nsb, 1, 1), 1, 2)
        )
        ls = torch.ones(rows, nsb, 16, device=x.device)
        dh = mh = _fp16(mx)
        lm = ls
    elif imatrix is None:
        scales, mins, L = make_qkx2_quants(xb, xb.abs(), 3, -0.5, 0.1, 15, True)
        max_scale = torch.clamp(scales.amax(-1), min=0.0)
        max_min = torch.clamp(mins.amax(-1), min=0.0)
        pos_s, pos_m = max_scale > 0, max_min > 0
        ls = torch.where(
            pos_s.unsqueeze(-1),
            rint((15 / torch.where(pos_s, max_scale, 1.0)).unsqueeze(-1) * scales),
            0.0,
        )
        lm = torch.where(
            pos_m.unsqueeze(-1),
            rint((15 / torch.where(pos_m, max_min, 1.0)).unsqueeze(-1) * mins),
            0.0,
        )
        ls, lm = ls.clamp(0, 15), lm.clamp(0, 15)
        dh = _fp16(torch.where(pos_s, max_scale / 15, 0.0))
        mh = _fp16(torch.where(pos_m, max_min / 15, 0.0))
        L = _quantize_levels(xb, dh.unsqueeze(-1) * ls, mh.unsqueeze(-1) * lm, 0, 3, L)
    else:
        xs = x.reshape(rows, nsb, QK_K)
        sigma2 = _sigma2(xs, 0.75)
        w = imatrix.reshape(1, nsb, 16, 16) * sqrt_f32(sigma2 + xb * xb)
        sw = seq_dot(w, torch.ones_like(w))  # (rows, nsb, 16)
        scales, mins, L = make_qkx3_quants(xb, w, 3, -0.9, 0.05, 36)
        L = L.float()
        dm, ls = make_qp_quants(scales, sw, 15)
        mm, lm = make_qp_quants(mins, sw, 15)
        dh, mh = _fp16(dm), _fp16(mm)
        d, m = dm.unsqueeze(-1) * ls, mm.unsqueeze(-1) * lm
        nz = d != 0
        idd = torch.where(nz, 1 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))
        L = torch.clamp(rint((xb + m.unsqueeze(-1)) * idd.unsqueeze(-1)), 0, 3)
    dh, mh, L = _improve(x, imatrix, 16, dh, mh, ls, lm, L, 0, 3)
    sc = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
    qs = _pack_crumbs(L.reshape(rows, nsb, QK_K))
    out = torch.cat([sc, qs, half_bytes(dh), half_bytes(mh)], dim=-1)
    return out.reshape(rows, -1)


def _q3_k_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    xb = _sub(x, 16)  # (rows, nsb, 16, 16)
    rows, nsb = xb.shape[:2]
    if imatrix is None:
        scales, L = make_q3_quants(xb, 4)
        _, max_scale = first_absmax(scales)
        nz = max_scale != 0
        iscale = -32 / torch.where(nz, max_scale, torch.ones_like(max_scale))
        ls = torch.where(
            nz.unsqueeze(-1), torch.clamp(rint(iscale.unsqueeze(-1) * scales), -32, 31) + 32, 32.0
        )
        dh = _fp16(torch.where(nz, 1 / iscale, 0.0))
    else:
        xs = x.reshape(rows, nsb, QK_K)
        w = imatrix.reshape(1, nsb, 16, 16) * sqrt_f32(_sigma2(xs, 2.0) + xb * xb)
        sw = seq_dot(w, torch.ones_like(w))
        scales, L = make_qx_quants(xb, w, 4)
        d_block, ls = make_qx_quants(scales, sw, 32)
        ls = ls.float()
        dh = _fp16(d_block)
    sc = ls - 32  # (rows, nsb, 16) signed
    L = _quantize_levels(xb, dh.unsqueeze(-1) * sc, torch.zeros_like(sc), -4, 3, L.float() - 4) + 4
    # refit d for the signed 6-bit scales: levels are L - 4
    Lc = L - 4
    dh2, _, Lc = _improve(x, imatrix, 16, dh, None, sc, None, Lc, -4, 3)
    dh, L = dh2, Lc + 4
    Li = L.to(torch.int64).reshape(rows, nsb, QK_K)
    hmask = _bitplane(Li > 3)
    qs = _pack_crumbs(Li & 3)
    u = ls.to(torch.int64)  # 0..63
    lo = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)  # (rows, nsb, 8)
    hi = u >> 4  # scale k: bits 2*(k//4) of byte 8 + k%4
    hb = (hi.reshape(rows, nsb, 4, 4) << (2 * torch.arange(4, device=x.device)).view(4, 1)).sum(-2)
    scb = torch.cat([lo, hb], dim=-1).to(torch.uint8)
    out = torch.cat([hmask, qs, scb, half_bytes(dh)], dim=-1)
    return out.reshape(rows, -1)


def _k4_encode(x: torch.Tensor, imatrix: torch.Tensor | None, nmax: int) -> torch.Tensor:
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins."""
    xb = _sub(x, 32)  # (rows, nsb, 8, 32)
    rows, nsb = xb.shape[:2]
    if imatrix is None:
        av_x = sqrt_f32(seq_dot(xb, xb) / 32)
        w = av_x.unsqueeze(-1) + xb.abs()
        params = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, L = make_qkx2_quants(xb, w, nmax, *params, False)
        max_scale = torch.clamp(scales.amax(-1), min=0.0)
        max_min = torch.clamp(mins.amax(-1), min=0.0)
        inv_s = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
        inv_m = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1.0), 0.0)
        ls = torch.clamp(rint(inv_s.unsqueeze(-1) * scales), 0, 63)
        lm = torch.clamp(rint(inv_m.unsqueeze(-1) * mins), 0, 63)
        dh, mh = _fp16(max_scale / 63), _fp16(max_min / 63)
    else:
        xs = x.reshape(rows, nsb, QK_K)
        w = imatrix.reshape(1, nsb, 8, 32) * sqrt_f32(_sigma2(xs, 2.0) + xb * xb)
        sw = seq_dot(w, torch.ones_like(w))
        scales, mins, L = make_qkx3_quants(xb, w, nmax, -0.9, 0.05, 36)
        L = L.float()
        d_block, ls = make_qp_quants(scales, sw, 63)
        m_block, lm = make_qp_quants(mins, sw, 63)
        dh, mh = _fp16(d_block), _fp16(m_block)
    L = _quantize_levels(xb, dh.unsqueeze(-1) * ls, mh.unsqueeze(-1) * lm, 0, nmax, L.float())
    dh, mh, L = _improve(x, imatrix, 32, dh, mh, ls, lm, L, 0, nmax)
    Li = L.to(torch.int64).reshape(rows, nsb, QK_K)
    fields = [half_bytes(dh), half_bytes(mh), _pack_k4_scales(ls, lm)]
    if nmax == 31:
        fields.append(_bitplane(Li >> 4))
    fields.append(_pack_k4_quants(Li))
    return torch.cat(fields, dim=-1).reshape(rows, -1)


def _q6_k_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    xb = _sub(x, 16)  # (rows, nsb, 16, 16)
    rows, nsb = xb.shape[:2]
    w = xb * xb if imatrix is None else imatrix.reshape(1, nsb, 16, 16).expand_as(xb)
    scales, L = make_qx_quants(xb, w, 32)
    amax, max_scale = first_absmax(scales)
    zero = amax < 1e-15
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    dh = _fp16(torch.where(zero, 0.0, 1 / iscale))
    sc = torch.where(zero.unsqueeze(-1), 0.0, torch.clamp(rint(iscale.unsqueeze(-1) * scales), max=127))
    Lc = _quantize_levels(xb, dh.unsqueeze(-1) * sc, torch.zeros_like(sc), -32, 31, L.float() - 32)
    Lc = torch.where(zero.view(rows, nsb, 1, 1), -32.0, Lc)
    dh, _, Lc = _improve(x, imatrix, 16, dh, None, sc, None, Lc, -32, 31)
    Li = (Lc + 32).to(torch.int64).reshape(rows, nsb, 2, 4, 32)  # (half, j, l): weight 128h + 32j + l
    lo = Li & 15
    ql = torch.cat([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], dim=-1)
    hi = Li >> 4
    qh = (hi << (2 * torch.arange(4, device=x.device)).view(4, 1)).sum(-2)  # (rows, nsb, 2, 32)
    scb = sc.to(torch.int8).view(torch.uint8)
    out = torch.cat(
        [
            ql.reshape(rows, nsb, 128).to(torch.uint8),
            qh.reshape(rows, nsb, 64).to(torch.uint8),
            scb,
            half_bytes(dh),
        ],
        dim=-1,
    )
    return out.reshape(rows, -1)


Q2_K.encode = lambda self, x, imatrix=None: _q2_k_encode(x, imatrix)  # noqa: E731
Q3_K.encode = lambda self, x, imatrix=None: _q3_k_encode(x, imatrix)  # noqa: E731
Q4_K.encode = lambda self, x, imatrix=None: _k4_encode(x, imatrix, 15)  # noqa: E731
Q5_K.encode = lambda self, x, imatrix=None: _k4_encode(x, imatrix, 31)  # noqa: E731
Q6_K.encode = lambda self, x, imatrix=None: _q6_k_encode(x, imatrix)  # noqa: E731
