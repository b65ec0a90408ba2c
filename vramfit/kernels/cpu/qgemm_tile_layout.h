/* The layouts both ISAs' interleaved tiles share (qgemm_tiles.h, qgemm_tiles_avx2.h; each defines IR,
 * its rows per tile, before including this): a quantized activation row, and the byte offsets in a
 * tile of IR rows. */

/* a quantized activation row: K int8 codes, then per 32-block the scale, per 16 the sum d * sum(q),
 * per 32 the same sum */
typedef struct {
    int64_t dx, xs, xs32, stride;
} ilayout;

static ilayout make_ilayout(int64_t K) {
    ilayout L;
    L.dx = round64(K);
    L.xs = L.dx + round64(K / 32 * 4);
    L.xs32 = L.xs + round64(K / 16 * 4);
    L.stride = L.xs32 + round64(K / 32 * 4);
    return L;
}

/* tile byte offsets for a K chunk of klen weights: codes, then row scales and offsets per group */
static inline int64_t tile_dw(int64_t klen) { return IR * klen; }
static inline int64_t tile_mw(int64_t klen, int group) { return IR * klen + IR * 4 * (klen / group); }
static inline int64_t tile_bytes(int64_t klen) { return IR * klen + 2 * IR * 4 * (klen / 16); }
/* room for IR packed row chunks of klen weights (at most 34 bytes per 32, plus a row scale) */
static inline int64_t packed_bytes(int64_t klen) { return IR * round64(klen * 17 / 16 + 64); }
