/* Legacy-block and IQ4_NL/IQ4_XS encoders and Q6_K: ports of vramfit/quant/legacy.py, iq4.py and
 * kquants.py (ggml's reference quantizers and ik_llama.cpp's imatrix searches). */
#include <stdlib.h>

#include "cenc.h"
#include "cenc_int.h"

static const float KV[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* legacy.rint: round half to even via 1.5*2^23 for |v| < 2^22, else v unchanged */
static inline float lrint_(float v) { return fabsf(v) < 4194304.0f ? (v + 12582912.0f) - 12582912.0f : v; }
static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

/* legacy.first_absmax: signed value at the first largest |x| */
static inline float first_absmax(const float *x, int n) { return x[ce_argmax_abs(x, n)]; }

/* legacy.importance: qw * sqrt(sigma2 + x^2), sigma2 = mean(x^2) over the row (sequential) */
static void legacy_importance(const float *x, int64_t n, const float *imat, float *w) {
    float acc = x[0] * x[0];
    for (int64_t i = 1; i < n; i++) acc = acc + x[i] * x[i];
    const float sigma2 = acc / (float)n;
    for (int64_t i = 0; i < n; i++) w[i] = imat[i] * (float)sqrt((double)(sigma2 + x[i] * x[i]));
}

/* legacy.make_qx_quants: levels in -nmax..nmax-1 (returned as L = l + nmax), scale */
static float make_qx_quants(const float *x, const float *w, int n, int nmax, int *Lout) {
    float lq[32], cand[32], wx[32];
    const float vm = first_absmax(x, n);
    const int tiny = fabsf(vm) < 1e-15f;
    const float vmax = tiny ? 1.0f : vm;
    for (int i = 0; i < n; i++) wx[i] = w[i] * x[i];
#define FIT(iscale, L, slx, sl2)                                                      \
    do {                                                                              \
        const float isc_ = (iscale);                                                  \
        for (int i = 0; i < n; i++) L[i] = clampf(lrint_(isc_ * x[i]), -nmax, nmax - 1); \
        slx = wx[0] * L[0];                                                           \
        sl2 = (w[0] * L[0]) * L[0];                                                   \
        for (int i = 1; i < n; i++) {                                                 \
            slx = slx + wx[i] * L[i];                                                 \
            sl2 = sl2 + (w[i] * L[i]) * L[i];                                         \
        }                                                                             \
    } while (0)
    float sumlx, suml2;
    FIT(-(float)nmax / vmax, lq, sumlx, suml2);
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    const float tenth = 0.1f;
    for (int step = -9; step <= 9; step++) {
        const float ts = tenth * (float)step;
        const float nums[2] = {-((float)nmax + ts), (float)(nmax - 1) + ts};
        for (int k = 0; k < 2; k++) {
            float c_lx, c_l2;
            FIT(nums[k] / vmax, cand, c_lx, c_l2);
            if (c_l2 > 0 && c_lx * c_lx > best * c_l2) {
                memcpy(lq, cand, sizeof(float) * n);
                sumlx = c_lx;
                suml2 = c_l2;
                scale = c_lx / c_l2;
                best = scale * sumlx;
            }
        }
    }
#undef FIT
    if (!tiny) {
        for (int it = 0; it < n * (2 * nmax - 1); it++) {
            const float s = scale;
            int j = 0;
            float agmax = -2.0f, gj = 0.0f;
            int found = 0;
            for (int i = 0; i < n; i++) {
                const float g = (s * w[i]) * (x[i] - s * lq[i]);
                const int mov = (g > 0 && lq[i] < nmax - 1) || (g < 0 && lq[i] > -nmax);
                const float ag = mov ? fabsf(g) : -1.0f;
                found |= mov;
                if (ag > agmax) {
                    agmax = ag;
                    j = i;
                    gj = g;
                }
            }
            const int up = gj > 0;
            const float wj = w[j], xj = x[j], lj = lq[j], wxj = wj * xj;
            const float new_lx = up ? sumlx + wxj : sumlx - wxj;
            const float new_l2 = up ? suml2 + wj * (2 * lj + 1) : suml2 - wj * (2 * lj - 1);
            if (!(found && new_l2 > 0 && new_lx * new_lx > best * new_l2)) break;
            sumlx = new_lx;
            suml2 = new_l2;
            scale = sumlx / suml2;
            best = scale * sumlx;
            lq[j] = lj + (up ? 1.0f : -1.0f);
        }
    }
    for (int i = 0; i < n; i++) Lout[i] = tiny ? 0 : (int)lq[i] + nmax;
    return tiny ? 0.0f : scale;
}

static inline void pack_nibbles(uint8_t *p, const int *q) {
    for (int j = 0; j < 16; j++) p[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

/* _sym_ref: d = max / -half, q = min(nlev-1, trunc(x/d + half + 0.5)) */
static float sym_ref(const float *x, int nlev, int *q) {
    const int half = nlev / 2;
    const float d = first_absmax(x, 32) / (float)-half;
    const float inv = d != 0 ? 1 / d : 0.0f;
    for (int j = 0; j < 32; j++) {
        const float v = truncf(x[j] * inv + ((float)half + 0.5f));
        q[j] = (int)(v > nlev - 1 ? nlev - 1 : v);
    }
    return d;
}

void ce_q8_0_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    (void)imat;
    for (int64_t b = 0; b < n / 32; b++, out += 34) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127, inv = d != 0 ? 1 / d : 0.0f;
        ce_put_f16(out, d);
        for (int j = 0; j < 32; j++) out[2 + j] = (uint8_t)(int8_t)roundf(xb[j] * inv);
    }
}

static void q40_50(const float *x, int64_t n, const float *imat, uint8_t *out, int nlev) {
    float *w = NULL;
    if (imat) {
        w = malloc(sizeof(float) * n);
        if (!w) abort();
        legacy_importance(x, n, imat, w);
    }
    const int bs = nlev == 16 ? 18 : 22;
    for (int64_t b = 0; b < n / 32; b++, out += bs) {
        int q[32];
        const float d = imat ? make_qx_quants(x + 32 * b, w + 32 * b, 32, nlev / 2, q) : sym_ref(x + 32 * b, nlev, q);
        ce_put_f16(out, d);
        if (nlev == 16) {
            pack_nibbles(out + 2, q);
        } else {
            /* legacy.pack_bits: byte i = sum_k uint8(uint8(q>>4) << k) mod 256 (0/1 except for
             * the degenerate levels of non-finite scales, kept bit-compatible) */
            for (int i = 0; i < 4; i++) {
                unsigned byte = 0;
                for (int k = 0; k < 8; k++) byte += (uint8_t)((uint8_t)(q[8 * i + k] >> 4) << k);
                out[2 + i] = (uint8_t)byte;
            }
            pack_nibbles(out + 6, q);
        }
    }
    free(w);
}
void ce_q4_0_row(const float *x, int64_t n, const float *imat, uint8_t *out) { q40_50(x, n, imat, out, 16); }
void ce_q5_0_row(const float *x, int64_t n, const float *imat, uint8_t *out) { q40_50(x, n, imat, out, 32); }

void ce_q6_0_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    float *w = malloc(sizeof(float) * n);
    if (!w) abort();
    if (imat)
        legacy_importance(x, n, imat, w);
    else
        for (int64_t i = 0; i < n; i++) w[i] = x[i] * x[i];
    for (int64_t b = 0; b < n / 32; b++, out += 26) {
        int q[32];
        const float d = make_qx_quants(x + 32 * b, w + 32 * b, 32, 32, q);
        ce_put_f16(out, d);
        int h[16];
        for (int j = 0; j < 16; j++) h[j] = (q[j] >> 4) | ((q[j + 16] >> 4) << 2);
        for (int j = 0; j < 8; j++) out[2 + j] = (uint8_t)(h[j] | (h[j + 8] << 4));
        pack_nibbles(out + 10, q);
    }
    free(w);
}

/* legacy.best_index on kvalues_iq4nl: nearest, exact ties to the higher index */
static int BELOW[256];
void ce_legacy_init(void) {
    for (int k = 0; k < 256; k++) {
        int c = 0;
        for (int i = 0; i < 16; i++) c += KV[i] <= (float)(k - 128);
        BELOW[k] = c;
    }
}
static inline int best_index(float v) {
    if (v <= KV[0]) return 0;
    if (v >= KV[15]) return 15;
    if (v != v) return 15; /* NaN (torch raises here); any in-range index */
    float f = floorf(v);
    f = f < -128 ? -128 : f > 127 ? 127 : f;
    int hi = BELOW[(int)f + 128];
    hi = hi < 1 ? 1 : hi > 15 ? 15 : hi;
    const int lo = hi - 1;
    return (v - KV[lo]) < (KV[hi] - v) ? lo : hi;
}

/* legacy.iq4_block_fit for one 32-block: d, grid indices L */
static float iq4_block_fit(const float *x, const float *w, int *L) {
    const int ntry = 7;
    const float vm = first_absmax(x, 32);
    const int tiny = fabsf(vm) < 1e-15f;
    const float vmax = tiny ? 1.0f : vm;
    int cand[32];
#define FIT(inv, I, sqx, sq2)                                   \
    do {                                                        \
        const float inv_ = (inv);                               \
        for (int i = 0; i < 32; i++) I[i] = best_index(inv_ * x[i]); \
        float wq_ = w[0] * KV[I[0]];                            \
        sqx = wq_ * x[0];                                       \
        sq2 = wq_ * KV[I[0]];                                   \
        for (int i = 1; i < 32; i++) {                          \
            wq_ = w[i] * KV[I[i]];                              \
            sqx = sqx + wq_ * x[i];                             \
            sq2 = sq2 + wq_ * KV[I[i]];                         \
        }                                                       \
    } while (0)
    float sumqx, sumq2;
    FIT(1 / (-vmax / KV[0]), L, sumqx, sumq2);
    float d = sumqx / sumq2;
    float best = d * sumqx;
    for (int itry = -ntry; itry <= ntry; itry++) {
        const float edges[2] = {(float)itry + KV[0], (float)itry + KV[15]};
        for (int e = 0; e < 2; e++) {
            float c_qx, c_q2;
            FIT(edges[e] / vmax, cand, c_qx, c_q2);
            if (c_q2 > 0 && c_qx * c_qx > best * c_q2) {
                memcpy(L, cand, sizeof(cand));
                sumqx = c_qx;
                sumq2 = c_q2;
                d = c_qx / c_q2;
                best = d * sumqx;
            }
        }
    }
#undef FIT
    if (!tiny) {
        for (int it = 0; it < 32 * 32; it++) {
            int j = 0, found = 0, dirj = 0;
            float smin = INFINITY;
            for (int i = 0; i < 32; i++) {
                const float v = KV[L[i]];
                const float g = (d * w[i]) * (x[i] - d * v);
                const int up_ok = g > 0 && L[i] < 15, dn_ok = g < 0 && L[i] > 0;
                const float su = (KV[L[i] + 1 > 15 ? 15 : L[i] + 1] - v) / g;
                const float sd = (KV[L[i] - 1 < 0 ? 0 : L[i] - 1] - v) / g;
                float st = up_ok ? su : dn_ok ? sd : INFINITY;
                const int elig = (up_ok || dn_ok) && st < INFINITY;
                if (!elig) st = INFINITY;
                found |= elig;
                if (st < smin) {
                    smin = st;
                    j = i;
                }
                (void)dirj;
            }
            if (!found) break;
            const float v = KV[L[j]];
            const float gj = (d * w[j]) * (x[j] - d * v);
            const int up = gj > 0 && L[j] < 15;
            const int dir = up ? 1 : -1;
            int ln = L[j] + dir;
            ln = ln < 0 ? 0 : ln > 15 ? 15 : ln;
            const float v_old = KV[L[j]], v_new = KV[ln];
            const float new_qx = sumqx + (w[j] * x[j]) * (v_new - v_old);
            const float new_q2 = sumq2 + w[j] * (v_new * v_new - v_old * v_old);
            if (!(new_q2 > 0 && new_qx * new_qx > best * new_q2)) break;
            sumqx = new_qx;
            sumq2 = new_q2;
            d = sumqx / sumq2;
            best = d * sumqx;
            L[j] = ln;
        }
    }
    return tiny ? 0.0f : d;
}

void ce_iq4_nl_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    for (int64_t b = 0; b < n / 32; b++, out += 18) {
        const float *xb = x + 32 * b;
        float w[32];
        if (imat) {
            float acc = xb[0] * xb[0];
            for (int j = 1; j < 32; j++) acc = acc + xb[j] * xb[j];
            const float sigma2 = acc * (2.0f / 32);
            for (int j = 0; j < 32; j++) w[j] = imat[32 * b + j] * (float)sqrt((double)(sigma2 + xb[j] * xb[j]));
        } else {
            for (int j = 0; j < 32; j++) w[j] = xb[j] * xb[j];
        }
        int L[32], q[32];
        const float d = iq4_block_fit(xb, w, L);
        const float inv = d != 0 ? 1 / d : 0.0f;
        for (int j = 0; j < 32; j++) q[j] = best_index(inv * xb[j]);
        ce_put_f16(out, d);
        pack_nibbles(out + 2, q);
    }
}

void ce_iq4_xs_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    for (int64_t sb = 0; sb < n / QK_K; sb++, out += 136) {
        const float *xs = x + QK_K * sb;
        float w[QK_K], scales[8];
        if (imat) {
            float acc = xs[0] * xs[0];
            for (int j = 1; j < QK_K; j++) acc = acc + xs[j] * xs[j];
            const float sigma2 = acc * (2.0f / 256);
            for (int j = 0; j < QK_K; j++) w[j] = imat[QK_K * sb + j] * (float)sqrt((double)(sigma2 + xs[j] * xs[j]));
        } else {
            for (int j = 0; j < QK_K; j++) w[j] = xs[j] * xs[j];
        }
        int L[32];
        for (int ib = 0; ib < 8; ib++) scales[ib] = iq4_block_fit(xs + 32 * ib, w + 32 * ib, L);
        const float d = -first_absmax(scales, 8) / 32;
        const float inv = d != 0 ? 1 / d : 0.0f;
        int ls[8];
        ce_put_f16(out, d);
        int h = 0;
        for (int ib = 0; ib < 8; ib++) {
            const float l = clampf(lrint_(inv * scales[ib]), -32, 31);
            ls[ib] = (int)l + 32;
            h |= (ls[ib] >> 4) << (2 * ib);
            const float dl = d * l, idl = dl != 0 ? 1 / dl : 0.0f;
            int q[32];
            for (int j = 0; j < 32; j++) q[j] = best_index(idl * xs[32 * ib + j]);
            pack_nibbles(out + 8 + 16 * ib, q);
        }
        out[2] = (uint8_t)h;
        out[3] = (uint8_t)(h >> 8);
        for (int i = 0; i < 4; i++) out[4 + i] = (uint8_t)((ls[2 * i] & 15) | ((ls[2 * i + 1] & 15) << 4));
    }
}

/* ---- Q6_K ------------------------------------------------------------------------------------ */

/* kquants._quantize_levels for m = 0: L = clamp(nearest((x + 0) / d), lo, hi) where d != 0 */
static void levels16(const float *x, float d, float lo, float hi, float *L) {
    if (d == 0) return;
    for (int j = 0; j < 16; j++) L[j] = clampf(lrint_((x[j] + 0.0f) / d), lo, hi);
}

static double sb_error16(const float *x, const float *W, float dh, const float *sc, const float *L) {
    double e = 0.0;
    for (int k = 0; k < 16; k++) {
        const float dl = dh * sc[k];
        for (int j = 0; j < 16; j++) {
            const double diff = (double)(dl * L[16 * k + j]) - (double)x[16 * k + j];
            e += (double)W[16 * k + j] * (diff * diff);
        }
    }
    return e;
}

void ce_q6_k_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    for (int64_t sb = 0; sb < n / QK_K; sb++, out += 210) {
        const float *xs = x + QK_K * sb;
        float W[QK_K], scales[16], L[QK_K];
        for (int j = 0; j < QK_K; j++) W[j] = imat ? imat[QK_K * sb + j] : xs[j] * xs[j];
        for (int k = 0; k < 16; k++) {
            int Li[16];
            scales[k] = make_qx_quants(xs + 16 * k, W + 16 * k, 16, 32, Li);
            for (int j = 0; j < 16; j++) L[16 * k + j] = (float)(Li[j] - 32);
        }
        const float ms = first_absmax(scales, 16);
        const int zero = fabsf(ms) < 1e-15f;
        const float iscale = -128.0f / (zero ? 1.0f : ms);
        float dh = ce_half(zero ? 0.0f : 1 / iscale);
        float sc[16];
        for (int k = 0; k < 16; k++) {
            const float v = lrint_(iscale * scales[k]);
            sc[k] = zero ? 0.0f : (v > 127 ? 127 : v);
        }
        for (int k = 0; k < 16; k++) levels16(xs + 16 * k, dh * sc[k], -32, 31, L + 16 * k);
        if (zero)
            for (int j = 0; j < QK_K; j++) L[j] = -32;
        /* _improve: keep the better of this and a least-squares refit of d (two rounds) */
        const double e0 = sb_error16(xs, W, dh, sc, L);
        float d1 = dh, L1[QK_K];
        memcpy(L1, L, sizeof(L1));
        for (int round = 0; round < 2; round++) {
            double saa = 0.0, sax = 0.0;
            for (int j = 0; j < QK_K; j++) {
                const double a = (double)(sc[j / 16] * L1[j]);
                saa += ((double)W[j] * a) * a;
                sax += ((double)W[j] * a) * (double)xs[j];
            }
            const double dn = saa > 0 ? sax / saa : (double)d1;
            d1 = ce_half((float)dn);
            for (int k = 0; k < 16; k++) levels16(xs + 16 * k, d1 * sc[k], -32, 31, L1 + 16 * k);
        }
        const double e1 = sb_error16(xs, W, d1, sc, L1);
        if (e1 < e0) {
            dh = d1;
            memcpy(L, L1, sizeof(L1));
        }
        /* pack: ql[128] | qh[64] | scales[16] | d */
        for (int h = 0; h < 2; h++) {
            const float *Lh = L + 128 * h;
            for (int l = 0; l < 32; l++) {
                int q[4];
                for (int j = 0; j < 4; j++) q[j] = (int)Lh[32 * j + l] + 32;
                out[64 * h + l] = (uint8_t)((q[0] & 15) | ((q[2] & 15) << 4));
                out[64 * h + 32 + l] = (uint8_t)((q[1] & 15) | ((q[3] & 15) << 4));
                out[128 + 32 * h + l] = (uint8_t)((q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6));
            }
        }
        for (int k = 0; k < 16; k++) out[192 + k] = (uint8_t)(int8_t)sc[k];
        ce_put_f16(out + 208, dh);
    }
}
