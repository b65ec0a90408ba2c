/* IQK encoders: IQ4_KS, IQ5_KS (f32 row scale, odd 7-bit block scales) and IQ4_K, IQ5_K (fp16
 * super-block scale, 6-bit scales of 16-weight blocks). Ports of vramfit/quant/iqk_ks.py,
 * iqk.py and iqk_encode.py (shared/docs/iqk-formats.md section 4). */
#include <stdlib.h>

#include "cenc.h"
#include "cenc_int.h"

static const int8_t IQ4K[32] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                                -123, -100, -79, -61, -45, -31, -18, -6, 5, 17, 29, 42, 57, 73, 93, 117};
static const int8_t IQ5NL[64] = {
    -126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
    -1,   5,    11,   17,  23,  29,  36,  43,  51,  59,  68,  77,  87,  97,  109, 121,
    -124, -112, -101, -90, -81, -72, -63, -55, -48, -41, -34, -28, -22, -16, -10, -4,
    1,    7,    13,   19,  25,  31,  38,  45,  53,  61,  70,  79,  89,  99,  111, 123};

static float G_IQ4K[32], G_IQ5NL[64];

void ce_iqk_init(void) {
    for (int i = 0; i < 32; i++) G_IQ4K[i] = IQ4K[i];
    for (int i = 0; i < 64; i++) G_IQ5NL[i] = IQ5NL[i];
}

/* iqk_encode.importance for one row: w (n), sigma2 per 256; qhelper over `block` columns */
void ce_iqk_importance(const float *x, int64_t n, const float *imat, int block, float plain_sigma,
                       float sigma_factor, float *w) {
    for (int64_t s = 0; s < n; s += QK_K) {
        const float *xs = x + s;
        float *ws = w + s;
        if (!imat && plain_sigma == 0.0f) {
            for (int j = 0; j < QK_K; j++) ws[j] = xs[j] * xs[j];
            continue;
        }
        float sumx2 = 0.0f;
        for (int j = 0; j < QK_K; j++) sumx2 = sumx2 + xs[j] * xs[j];
        const float sigma2 = sumx2 * (sigma_factor / QK_K);
        if (!imat) {
            const float ps = plain_sigma * sigma2;
            for (int j = 0; j < QK_K; j++) ws[j] = ce_fma(xs[j], xs[j], ps);
            continue;
        }
        const float *im = imat + s;
        const float tiny = (float)(block * 1e-18);
        for (int b = 0; b < QK_K; b += block) {
            float sw2 = 0.0f, sx2 = 0.0f, swx = 0.0f;
            for (int j = b; j < b + block; j++) {
                sw2 += im[j] * im[j];
                sx2 += xs[j] * xs[j];
                swx += im[j] * fabsf(xs[j]);
            }
            const int bad = sw2 <= tiny || sx2 <= tiny || swx <= tiny;
            for (int j = b; j < b + block; j++) {
                const float q = bad ? 1e-9f : im[j];
                ws[j] = q * sqrtf(ce_fma(xs[j], xs[j], sigma2));
            }
        }
    }
}

/* nearest index into the 2n-entry grid g, on its half chosen by shift */
static inline int nearest_shifted(const float *g, int n, int shift, float v) {
    return shift ? n + ce_nearest(g + n, n, v) : ce_nearest(g, n, v);
}

/* iqk_encode.search_scales for one block (xb, wb of B weights): pass 1 of section 4.1 */
void ce_search_block_scalar(const float *xb, const float *wb, int B, const float *g, int n, int ntry, int initial,
                            float *out_scale, int *out_shift) {
    const int k = ce_argmax_abs(xb, B);
    const float m = xb[k], amax = fabsf(m);
    if (amax < 1e-16f) {
        *out_scale = 0.0f;
        *out_shift = 0;
        return;
    }
    float scale = 0.0f, best = 0.0f;
    int shift = 0, first = initial;
    const int ncand = (initial ? 2 : 0) + (2 * ntry + 1) * 4;
    for (int c = 0; c < ncand; c++) {
        float off;
        int flag, mir;
        if (initial && c < 2) {
            off = -g[0];
            flag = 0;
            mir = c;
        } else {
            const int cc = c - (initial ? 2 : 0);
            const int t = cc / 4 - ntry;
            flag = (cc / 2) & 1;
            mir = cc & 1;
            off = (float)t + g[flag * n];
        }
        const float inv = off / m;
        const float *gh = g + flag * n;
        float sqx = 0.0f, sq2 = 0.0f;
        for (int j = 0; j < B; j++) {
            float al = inv * xb[j];
            if (mir) al = -al;
            const float q = gh[ce_nearest(gh, n, al)];
            const float wq = wb[j] * q;
            sqx = ce_fma(wq, xb[j], sqx);
            sq2 = ce_fma(wq, q, sq2);
        }
        int ok = sq2 > 0;
        if (!first) ok = ok && sqx * sqx > best * sq2;
        first = 0;
        if (ok) {
            const float d = sqx / sq2;
            scale = d;
            best = d * sqx;
            shift = flag;
        }
    }
    *out_scale = scale;
    *out_shift = shift;
}

/* iqk_encode._polish: re-pick indices with the winning scale and refit once */
static float polish(const float *xb, const float *wb, int B, const float *g, int n, float scale, int shift) {
    if (scale == 0.0f) return scale;
    const float inv = 1.0f / scale;
    float sqx = 0.0f, sq2 = 0.0f;
    for (int j = 0; j < B; j++) {
        const float q = g[nearest_shifted(g, n, shift, inv * xb[j])];
        const float wq = wb[j] * q;
        sqx = ce_fma(wq, xb[j], sqx);
        sq2 = ce_fma(wq, q, sq2);
    }
    return sq2 > 0 ? sqx / sq2 : scale;
}

static void search_row(const float *x, const float *w, int64_t n, int B, const float *g, int ng, int ntry, int pol,
                       float *scale, int *shift) {
    for (int64_t b = 0; b < n / B; b++) {
        ce_search_block(x + b * B, w + b * B, B, g, ng, ntry, 1, scale + b, shift + b);
        if (pol) scale[b] = polish(x + b * B, w + b * B, B, g, ng, scale[b], shift[b]);
    }
}

/* iqk_ks._encode_odd_scales: d_row, scale bytes (n/32), indices (n) into the 2ng grid */
static float encode_odd_scales(const float *x, int64_t n, const float *imat, const float *g, int ng, int ntry,
                               int pair, uint8_t *sbytes, uint8_t *idx, float *w, float *scale, int *shift) {
    const int64_t nsub = n / 32;
    ce_iqk_importance(x, n, imat, 32, 0.0f, 2.0f, w);
    search_row(x, w, n, 32, g, ng, ntry, 0, scale, shift);
    float amax = 0.0f;
    for (int64_t b = 0; b < nsub; b++) amax = fmaxf(amax, fabsf(scale[b]));
    float d_row = amax / 127;
    if (!(d_row > 0)) {
        memset(sbytes, 0, nsub);
        memset(idx, 0, n);
        return 0.0f;
    }
    const float inv_d = 1 / d_row;
    float A = 0.0f, Bs = 0.0f;
    double Ad = 0.0, Bd = 0.0;
    (void)Ad;
    (void)Bd;
    for (int64_t b = 0; b < nsub; b++) {
        float lev = ce_rint(0.5f * ce_fma(inv_d, scale[b], 127.0f));
        lev = lev < 0 ? 0 : lev > 127 ? 127 : lev;
        const int il = (int)lev;
        const float L = (float)(2 * il - 127);
        const float dl = d_row * L, idl = 1 / dl;
        sbytes[b] = (uint8_t)((il << 1) | shift[b]);
        const float *xb = x + b * 32, *wb = w + b * 32;
        float q[32], wq[32];
        for (int j = 0; j < 32; j++) {
            const int i = nearest_shifted(g, ng, shift[b], idl * xb[j]);
            idx[b * 32 + j] = (uint8_t)i;
            q[j] = g[i] * L;
            wq[j] = wb[j] * q[j];
        }
        if (pair) {
            for (int j = 0; j < 16; j++) {
                A = A + ce_fma(wq[j], xb[j], wq[j + 16] * xb[j + 16]);
                Bs = Bs + ce_fma(wq[j], q[j], wq[j + 16] * q[j + 16]);
            }
        } else {
            for (int j = 0; j < 32; j++) {
                A = ce_fma(wq[j], xb[j], A);
                Bs = ce_fma(wq[j], q[j], Bs);
            }
        }
    }
    if (Bs > 0) d_row = A / Bs;
    return d_row;
}

typedef struct {
    float *w, *scale;
    int *shift;
    uint8_t *idx, *sb;
} scratch;

static int scratch_get(scratch *s, int64_t n) {
    s->w = malloc(sizeof(float) * n);
    s->scale = malloc(sizeof(float) * (n / 16));
    s->shift = malloc(sizeof(int) * (n / 16));
    s->idx = malloc(n);
    s->sb = malloc(n / 16);
    return s->w && s->scale && s->shift && s->idx && s->sb;
}
static void scratch_free(scratch *s) {
    free(s->w);
    free(s->scale);
    free(s->shift);
    free(s->idx);
    free(s->sb);
}

void ce_iq4_ks_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    scratch s;
    if (!scratch_get(&s, n)) abort();
    const float d = encode_odd_scales(x, n, imat, G_IQ4K, 16, 7, 16, s.sb, s.idx, s.w, s.scale, s.shift);
    ce_put_f32(out, d);
    uint8_t *p = out + 4;
    for (int64_t sb = 0; sb < n / QK_K; sb++, p += 136) {
        memcpy(p, s.sb + sb * 8, 8);
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *ix = s.idx + sb * QK_K + ib * 32;
            for (int j = 0; j < 16; j++) p[8 + 16 * ib + j] = (uint8_t)((ix[j] & 15) | ((ix[j + 16] & 15) << 4));
        }
    }
    scratch_free(&s);
}

void ce_iq5_ks_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    scratch s;
    if (!scratch_get(&s, n)) abort();
    const float d = encode_odd_scales(x, n, imat, G_IQ5NL, 32, 5, 0, s.sb, s.idx, s.w, s.scale, s.shift);
    ce_put_f32(out, d);
    uint8_t *p = out + 4;
    for (int64_t sb = 0; sb < n / QK_K; sb++, p += 168) {
        memcpy(p, s.sb + sb * 8, 8);
        const uint8_t *ix = s.idx + sb * QK_K;
        for (int c = 0; c < 4; c++)
            for (int j = 0; j < 32; j++)
                p[8 + 32 * c + j] = (uint8_t)((ix[64 * c + j] & 15) | ((ix[64 * c + 32 + j] & 15) << 4));
        for (int j = 0; j < 32; j++) {
            int h = 0;
            for (int ib = 0; ib < 8; ib++) h |= ((ix[32 * ib + j] & 31) >> 4) << ib;
            p[136 + j] = (uint8_t)h;
        }
    }
    scratch_free(&s);
}

/* iqk._encode_bs16 for one row: per super-block d (fp16 value), L (16), shift (16), idx (256) */
static void encode_bs16(const float *x, int64_t n, const float *imat, const float *g, int ng, int ntry, int lmax,
                        float plain_sigma, int pol, scratch *s, float *dsb, int *Ls) {
    ce_iqk_importance(x, n, imat, 16, plain_sigma, 2.0f, s->w);
    search_row(x, s->w, n, 16, g, ng, ntry, pol, s->scale, s->shift);
    const int hi = lmax == 127 ? lmax : lmax - 1;
    for (int64_t sb = 0; sb < n / QK_K; sb++) {
        const float *sc = s->scale + sb * 16;
        int *sh = s->shift + sb * 16;
        int *L = Ls + sb * 16;
        uint8_t *idx = s->idx + sb * QK_K;
        const float *xs = x + sb * QK_K, *ws = s->w + sb * QK_K;
        const int kmax = ce_argmax_abs(sc, 16);
        float d = -sc[kmax] / (float)lmax;
        if (!(d != 0)) {
            dsb[sb] = 0.0f;
            for (int k = 0; k < 16; k++) L[k] = sh[k] = 0;
            memset(idx, 0, QK_K);
            continue;
        }
        const float inv_d = 1 / d;
        float A = 0.0f, B = 0.0f;
        for (int k = 0; k < 16; k++) {
            float l = ce_rint(inv_d * sc[k]);
            l = l < -lmax ? (float)-lmax : l > hi ? (float)hi : l;
            L[k] = (int)l;
            const float dl = d * l;
            const float idl = dl != 0 ? 1 / dl : 0.0f;
            for (int j = 0; j < 16; j++) {
                const float xv = xs[16 * k + j];
                const int i = nearest_shifted(g, ng, sh[k], idl * xv);
                idx[16 * k + j] = (uint8_t)i;
                const float q = g[i] * l;
                const float wq = ws[16 * k + j] * q;
                A = ce_fma(wq, xv, A);
                B = ce_fma(wq, q, B);
            }
        }
        if (B > 0) d = A / B;
        d = d < -65504.0f ? -65504.0f : d > 65504.0f ? 65504.0f : d;
        dsb[sb] = d;
    }
}

static void bs16_header(uint8_t *p, float d, const int *sh, const int *L) {
    ce_put_f16(p, d);
    int extra = 0;
    for (int k = 0; k < 16; k++) extra |= sh[k] << k;
    p[2] = (uint8_t)extra;
    p[3] = (uint8_t)(extra >> 8);
    /* scales_h[4] | scales_l[8] */
    for (int i = 0; i < 4; i++) {
        int h = 0;
        for (int k = 0; k < 4; k++) h |= ((L[4 * i + k] + 32) >> 4) << (2 * k);
        p[4 + i] = (uint8_t)h;
    }
    for (int i = 0; i < 8; i++) p[8 + i] = (uint8_t)(((L[2 * i] + 32) & 15) | (((L[2 * i + 1] + 32) & 15) << 4));
}

void ce_iq4_k_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    scratch s;
    if (!scratch_get(&s, n)) abort();
    const int64_t nb = n / QK_K;
    float *d = malloc(sizeof(float) * nb);
    int *L = malloc(sizeof(int) * nb * 16);
    if (!d || !L) abort();
    encode_bs16(x, n, imat, G_IQ4K, 16, 7, 32, 0.0f, 0, &s, d, L);
    for (int64_t sb = 0; sb < nb; sb++) {
        uint8_t *p = out + 144 * sb;
        bs16_header(p, d[sb], s.shift + 16 * sb, L + 16 * sb);
        const uint8_t *ix = s.idx + sb * QK_K;
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 16; j++)
                p[16 + 16 * i + j] = (uint8_t)((ix[32 * i + j] & 15) | ((ix[32 * i + 16 + j] & 15) << 4));
    }
    free(d);
    free(L);
    scratch_free(&s);
}

void ce_iq5_k_row(const float *x, int64_t n, const float *imat, uint8_t *out) {
    scratch s;
    if (!scratch_get(&s, n)) abort();
    const int64_t nb = n / QK_K;
    float *d = malloc(sizeof(float) * nb);
    int *L = malloc(sizeof(int) * nb * 16);
    if (!d || !L) abort();
    encode_bs16(x, n, imat, G_IQ5NL, 32, 5, 32, 0.25f, 1, &s, d, L);
    for (int64_t sb = 0; sb < nb; sb++) {
        uint8_t *p = out + 176 * sb;
        bs16_header(p, d[sb], s.shift + 16 * sb, L + 16 * sb);
        const uint8_t *ix = s.idx + sb * QK_K;
        for (int c = 0; c < 4; c++)
            for (int j = 0; j < 32; j++)
                p[16 + 32 * c + j] = (uint8_t)((ix[64 * c + j] & 15) | ((ix[64 * c + 32 + j] & 15) << 4));
        for (int j = 0; j < 32; j++) {
            int h = 0;
            for (int gi = 0; gi < 8; gi++) h |= ((ix[32 * gi + j] & 31) >> 4) << gi;
            p[144 + j] = (uint8_t)h;
        }
    }
    free(d);
    free(L);
    scratch_free(&s);
}
