"""Importance-weighted quantizer search shared by the IQK encoders (ik_llama.cpp, IQ4_KS family).

Implements shared/docs/iqk-formats.md section 4: per-weight error weights (4.0), the nearest-grid
rule (2.3), and the pass-1 search over inverse scales that picks a signed float scale and a grid
shift per sub-block (4.1). Sums run sequentially over the weights of a block, in float32, in the
reference's order (with fused multiply-adds where the reference build contracts them), vectorised
over blocks; loops are only over the fixed candidates and block positions.
"""

from __future__ import annotations

import torch

QK_K = 256
CHUNK = 1 << 22  # elements of the (blocks, candidates, block) work tensor per chunk


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b + c with one rounding, as a compiled FMA does (exact product in float64)."""
    return (a.double() * b.double() + c.double()).float()


def rint(x: torch.Tensor) -> torch.Tensor:
    """nearest_int: float32 round-half-to-even (spec 2.2)."""
    return torch.round(x)


def nearest_index(grid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted float32 `grid` (n,) for each x; exact ties go up (2.3)."""
    n = grid.shape[0]
    k = torch.searchsorted(grid, x.contiguous(), right=True)  # count of grid values <= x
    lo = (k - 1).clamp(0, n - 1)
    hi = k.clamp(0, n - 1)
    take_lo = (x - grid[lo]) < (grid[hi] - x)
    return torch.where(take_lo, lo, hi)


def importance(
    xs: torch.Tensor,
    imatrix: torch.Tensor | None,
    block: int,
    plain_sigma: float = 0.0,
    sigma_factor: float = 2.0,
):
    """Per-weight error weights (4.0). xs: (rows, n_sb, 256) -> (rows, n_sb, 256) float32.

    With an imatrix: imatrix_j * sqrt(sigma2 + x_j^2), sigma2 = sigma_factor*mean(x^2) over the
    super-block (2 for most types; IQ2_KS, IQ2_K and IQ3_K use 1.5, IQ2_KL 2.25); imatrix blocks
    of `block` columns that are degenerate for a row are replaced by 1e-9.
    Without: plain_sigma*sigma2 + x_j^2 (0 for most types; IQ2_KS, IQ2_K, IQ3_K, IQ5_K and IQ6_K use 0.25).
    """
    if imatrix is None and plain_sigma == 0.0:
        return xs * xs
    rows, n_sb, _ = xs.shape
    sumx2 = torch.zeros(rows, n_sb, dtype=torch.float32, device=xs.device)
    for j in range(QK_K):  # sequential, as the reference accumulates
        sumx2 = sumx2 + xs[..., j] * xs[..., j]
    sigma2 = (sumx2 * (sigma_factor / QK_K)).unsqueeze(-1).expand_as(xs)
    if imatrix is None:
        return fma(xs, xs, plain_sigma * sigma2)
    imat = imatrix.to(device=xs.device, dtype=torch.float32).reshape(1, n_sb, QK_K).expand(rows, -1, -1)
    imat = _qhelper(imat, xs, block)
    # torch's float32 sqrt is not correctly rounded on every CPU; through float64 it is
    return imat * torch.sqrt(fma(xs, xs, sigma2).double()).float()


def _qhelper(imat: torch.Tensor, xs: torch.Tensor, block: int) -> torch.Tensor:
    """Replace a row's imatrix block by 1e-9 when sum w^2, sum x^2 or sum w|x| is <= block*1e-18."""
    shape = imat.shape
    wb = imat.reshape(*shape[:-1], -1, block)
    xb = xs.reshape(wb.shape)
    tiny = block * 1e-18
    bad = ((wb * wb).sum(-1) <= tiny) | ((xb * xb).sum(-1) <= tiny) | ((wb * xb.abs()).sum(-1) <= tiny)
    return torch.where(bad.unsqueeze(-1), torch.full_like(wb, 1e-9), wb).reshape(shape)


def block_max(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, B) -> (amax = |x_k|, m = x_k) at the first index k of max |x| in each block."""
    k = xb.abs().argmax(-1, keepdim=True)  # argmax returns the first maximum
    m = xb.gather(-1, k).squeeze(-1)
    return m.abs(), m


def weighted_sums(wq: torch.Tensor, q: torch.Tensor, x: torch.Tensor):
    """Sequential float32 sums over the last dim, each step one FMA: (sum (w*q)*x, sum (w*q)*q)."""
    wq, q, x = wq.double(), q.double(), x.double()
    sumqx = torch.zeros(wq.shape[:-1], dtype=torch.float32, device=wq.device)
    sumq2 = torch.zeros_like(sumqx)
    for j in range(wq.shape[-1]):
        sumqx = (wq[..., j] * x[..., j] + sumqx).float()
        sumq2 = (wq[..., j] * q[..., j] + sumq2).float()
    return sumqx, sumq2


def candidate_table(grid: torch.Tensor, ntry: int, initial: bool):
    """The ordered candidate list of 4.1: (offset (C,), uses_shifted_grid (C,), mirrored (C,)).

    A candidate maps the block's extreme weight m onto `offset`, i.e. inv = offset / m; the
    mirrored (M) candidates quantize -inv*x. The two initial candidates use -grid[0] on the base grid.
    """
    n = grid.shape[0] // 2
    offs, flags, mirror = [], [], []
    if initial:
        offs += [-float(grid[0])] * 2
        flags += [0, 0]
        mirror += [False, True]
    for t in range(-ntry, ntry + 1):
        for flag in (0, 1):
            g0 = float(grid[flag * n])
            offs += [t + g0] * 2
            flags += [flag, flag]
            mirror += [False, True]
    return offs, flags, mirror


def search_scales(
    xb: torch.Tensor,
    wb: torch.Tensor,
    grid: torch.Tensor,
    ntry: int,
    initial: bool = True,
    polish: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of 4.1 for blocks xb, wb (N, B): best signed float scale (N,) and shift flag (N,) int32.

    polish: re-pick the indices with the winning scale and refit it once (IQ5_K, IQ6_K; found to
    reproduce the reference bytes).
    """
    per_chunk = max(1, CHUNK // (xb.shape[-1] * (4 * ntry + 6)))
    parts = [
        _search_chunk(xb[i : i + per_chunk], wb[i : i + per_chunk], grid, ntry, initial)
        for i in range(0, xb.shape[0], per_chunk)
    ]
    scale, shift = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (_polish(xb, wb, grid, scale, shift) if polish else scale), shift


def _polish(xb, wb, grid, scale, shift):
    """One refit: indices nearest to x/scale on the chosen grid, then scale = sum wqx / sum wq^2."""
    ok = scale != 0
    inv = torch.where(ok, 1 / torch.where(ok, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    idx = nearest_in_shifted(grid, shift, inv.unsqueeze(-1) * xb)
    q = grid.to(device=xb.device, dtype=torch.float32)[idx]
    sumqx, sumq2 = weighted_sums(wb * q, q, xb)
    refit = sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2))
    return torch.where(ok & (sumq2 > 0), refit, scale)


def candidate_sums(xb, wb, grid, offs, flags, mirror):
    """For blocks (N, B) and C candidates: (sum wqx, sum wq^2), each (N, C), and the block's extreme m."""
    n = grid.shape[0] // 2
    dev = xb.device
    gf = grid.to(device=dev, dtype=torch.float32)
    amax, m = block_max(xb)
    safe_m = torch.where(amax < 1e-16, torch.ones_like(m), m)
    inv = torch.tensor(offs, dtype=torch.float32, device=dev) / safe_m.unsqueeze(-1)  # (N, C)
    al = inv.unsqueeze(-1) * xb.unsqueeze(1)  # (N, C, B)
    sign = torch.tensor([-1.0 if mir else 1.0 for mir in mirror], device=dev)
    al = al * sign[:, None]
    flag = torch.tensor(flags, device=dev).bool()[:, None]
    q = torch.where(flag, gf[n:][nearest_index(gf[n:], al)], gf[:n][nearest_index(gf[:n], al)])
    sumqx, sumq2 = weighted_sums(wb.unsqueeze(1) * q, q, xb.unsqueeze(1).expand_as(q))
    return sumqx, sumq2, amax


def _search_chunk(xb, wb, grid, ntry, initial):
    """Candidates are ranked in order by (sum wqx)^2 / sum wq^2; a later one must be strictly better."""
    offs, flags, mirror = candidate_table(grid, ntry, initial)
    sumqx, sumq2, amax = candidate_sums(xb, wb, grid, offs, flags, mirror)
    scale = torch.zeros_like(amax)
    shift = torch.zeros(amax.shape, dtype=torch.int32, device=xb.device)
    best = torch.zeros_like(amax)
    for c, flag in enumerate(flags):
        sqx, sq2 = sumqx[:, c], sumq2[:, c]
        if c == 0 and initial:
            ok = sq2 > 0
        else:
            ok = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        scale = torch.where(ok, d, scale)
        best = torch.where(ok, d * sqx, best)
        shift = torch.where(ok, torch.full_like(shift, flag), shift)
    zero = amax < 1e-16
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(
        zero, torch.zeros_like(shift), shift
    )


def nearest_in_shifted(grid: torch.Tensor, shift: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-block grid choice: grid (2n,) int8, shift (..., ) int32, v (..., B) -> indices into grid (2n)."""
    n = grid.shape[0] // 2
    gf = grid.to(device=v.device, dtype=torch.float32)
    base = nearest_index(gf[:n], v)
    shifted = nearest_index(gf[n:], v) + n
    return torch.where(shift.unsqueeze(-1).bool(), shifted, base)


def row_refit(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, pair: int):
    """Row-scale refit sums (A, B) = (sum w q x, sum w q^2) per row, sequential over all its weights.

    w, q, x: (rows, n_blocks, block). With pair > 0 weights j and j+pair of a block are added as
    one term fma(w1*q1, x1, w2*q2*x2) (IQ4_KS); with pair == 0 every weight is one FMA step
    (IQ5_KS), as the reference build contracts them.
    """
    rows = w.shape[0]
    A = torch.zeros(rows, dtype=torch.float32, device=w.device)
    B = torch.zeros_like(A)
    wq = w * q
    if pair == 0:
        wq, qf, xf = wq.flatten(1).double(), q.flatten(1).double(), x.flatten(1).double()
        for j in range(wq.shape[1]):
            A = (wq[:, j] * xf[:, j] + A).float()
            B = (wq[:, j] * qf[:, j] + B).float()
        return A, B
    lo, hi = slice(0, pair), slice(pair, 2 * pair)
    terms_a = fma(wq[..., lo], x[..., lo], wq[..., hi] * x[..., hi]).flatten(1)
    terms_b = fma(wq[..., lo], q[..., lo], wq[..., hi] * q[..., hi]).flatten(1)
    for j in range(terms_a.shape[1]):
        A = A + terms_a[:, j]
        B = B + terms_b[:, j]
    return A, B


def fma_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sum over the last dim of a*b, each step one FMA."""
    total = torch.zeros(a.shape[:-1], dtype=torch.float32, device=a.device)
    for j in range(a.shape[-1]):
        total = fma(a[..., j], b[..., j], total)
    return total


def max_abs_signed(s: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (...,): the first entry of largest magnitude, with its sign."""
    return s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)


def make_qx_quants(scales: torch.Tensor, sw: torch.Tensor, nmax: int):
    """Scale and integer levels for the block scales of a row or super-block (iqk make_qx_quants).

    scales, sw (..., n) -> (d (...,), L (..., n) int32 in [0, 2*nmax)): L - nmax = nearest(iscale*s)
    clamped to [-nmax, nmax-1]; iscale = -(nmax + 0.1 t)/max over t = 0, -9..9 (max: the scale of
    largest magnitude); the best sw-weighted fit wins. All-zero scales give d = 0, L = 0.
    """
    max_s = max_abs_signed(scales)
    nz = max_s != 0
    safe = torch.where(nz, max_s, torch.ones_like(max_s))
    best_d = best = best_l = None
    for t in [0] + [t for t in range(-9, 10) if t != 0]:
        if t == 0:
            num = torch.tensor(-float(nmax), device=scales.device)
        else:  # -(nmax + 0.1f*t), contracted to one FMA as in the reference build
            tenth = torch.tensor(0.1, dtype=torch.float32)
            num = -fma(tenth, torch.tensor(float(t)), torch.tensor(float(nmax))).to(scales.device)
        lev = rint((num / safe).unsqueeze(-1) * scales).clamp(-nmax, nmax - 1)
        sumlx = fma_sum(sw * scales, lev)
        suml2 = fma_sum(sw * lev, lev)
        d = sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2))
        if t == 0:
            best_d = torch.where(suml2 != 0, d, torch.zeros_like(d))
            best, best_l = best_d * sumlx, lev
        else:
            ok = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_d, best = torch.where(ok, d, best_d), torch.where(ok, d * sumlx, best)
            best_l = torch.where(ok.unsqueeze(-1), lev, best_l)
    L = (best_l + nmax).to(torch.int32)
    return torch.where(nz, best_d, torch.zeros_like(best_d)), torch.where(
        nz.unsqueeze(-1), L, torch.zeros_like(L)
    )
