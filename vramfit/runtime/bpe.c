/* Byte-level BPE merging for GPT-2 style vocabularies: `vramfit.runtime._bpe`.
 *
 * Why not HF tokenizers' BPE model: it keeps the vocabulary as two maps of owned strings plus a
 * map of the merges, about 11 MiB for a 49K vocabulary and 30 MiB for a 151K one. Here the
 * vocabulary is its raw bytes with an offset table, and both lookups are open-addressed tables
 * of 32-bit indices: about 2 MiB and 6 MiB.
 *
 * Tokens and merges arrive as GGUF stores them: GPT-2's printable byte alphabet (a byte b is the
 * character `bytes_to_unicode()[b]`), merges as "left right". Tokens are stored as raw bytes; a
 * token with a character outside that alphabet can never come out of a byte-level merge, so it is
 * left out of the lookup table, as HF's BPE never produces it either.
 *
 * Merging a piece (as llama.cpp's llm_tokenizer_bpe_session and HF's BPE without dropout): each
 * byte starts as its own symbol (bytes missing from the vocabulary are dropped, as HF does without
 * an unknown token); the adjacent pair with the lowest merge rank is merged, the leftmost on ties,
 * until no adjacent pair has a merge. A min-heap of (rank, position) whose stale entries are
 * skipped makes a piece of n bytes O(n log n). With `ignore_merges` (llama 3) a piece that is a
 * whole vocabulary token is that token. Duplicate merges keep their first rank and duplicate
 * tokens their last id, as llama.cpp's bpe_ranks and token_to_id maps do.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int16_t cp_byte[324]; /* byte-level character -> byte, -1 outside the alphabet */

static void init_alphabet(void) {
    int shift = 0;
    for (int cp = 0; cp < 324; cp++) cp_byte[cp] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
        cp_byte[printable ? b : 256 + shift++] = (int16_t)b;
    }
}

/* raw bytes of a byte-level string, or -1 when a character is outside the alphabet or the UTF-8
 * is invalid; out must hold n bytes */
static Py_ssize_t unmap(const uint8_t *s, Py_ssize_t n, uint8_t *out) {
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n;) {
        uint32_t cp;
        if (s[i] < 0x80) {
            cp = s[i++];
        } else if ((s[i] & 0xe0) == 0xc0 && i + 1 < n && (s[i + 1] & 0xc0) == 0x80) {
            cp = ((uint32_t)(s[i] & 0x1f) << 6) | (s[i + 1] & 0x3f);
            i += 2;
        } else {
            return -1; /* every character of the alphabet is one or two UTF-8 bytes */
        }
        if (cp >= 324 || cp_byte[cp] < 0) return -1;
        out[k++] = (uint8_t)cp_byte[cp];
    }
    return k;
}

typedef struct {
    PyObject_HEAD
    uint8_t *blob;   /* raw bytes of the tokens: token i is blob[off[i] .. off[i + 1]) */
    uint64_t *off;   /* n + 1 offsets */
    int32_t n;
    int32_t *vtab;   /* vocabulary table: token ids, -1 empty */
    int vbits;
    int32_t byte_id[256];
    int32_t *mleft, *mright, *mout; /* merge of rank r: (mleft[r], mright[r]) -> mout[r] */
    int32_t nm;
    int32_t *mtab;   /* merge table: ranks, -1 empty */
    int mbits;
    int ignore_merges;
    size_t nbytes;
} BPE;

static uint64_t hash_bytes(const uint8_t *s, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return h * 0x9e3779b97f4a7c15ull;
}

static uint64_t hash_pair(int32_t a, int32_t b) {
    return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) * 0x9e3779b97f4a7c15ull;
}

static int table_bits(Py_ssize_t n) { /* load factor at most 1/2 */
    int bits = 4;
    while (((Py_ssize_t)1 << bits) < 2 * n) bits++;
    return bits;
}

static int32_t vocab_find(const BPE *b, const uint8_t *s, Py_ssize_t n) {
    const uint32_t mask = (1u << b->vbits) - 1;
    for (uint32_t i = (uint32_t)(hash_bytes(s, n) >> (64 - b->vbits));; i = (i + 1) & mask) {
        int32_t id = b->vtab[i];
        if (id < 0) return -1;
        uint64_t len = b->off[id + 1] - b->off[id];
        if (len == (uint64_t)n && memcmp(b->blob + b->off[id], s, (size_t)n) == 0) return id;
    }
}

static void vocab_insert(BPE *b, int32_t id) {
    const uint8_t *s = b->blob + b->off[id];
    const Py_ssize_t n = (Py_ssize_t)(b->off[id + 1] - b->off[id]);
    const uint32_t mask = (1u << b->vbits) - 1;
    for (uint32_t i = (uint32_t)(hash_bytes(s, n) >> (64 - b->vbits));; i = (i + 1) & mask) {
        int32_t old = b->vtab[i];
        if (old < 0 || (b->off[old + 1] - b->off[old] == (uint64_t)n &&
                        memcmp(b->blob + b->off[old], s, (size_t)n) == 0)) {
            b->vtab[i] = id; /* a later duplicate wins */
            return;
        }
    }
}

static int32_t merge_rank(const BPE *b, int32_t l, int32_t r) {
    const uint32_t mask = (1u << b->mbits) - 1;
    for (uint32_t i = (uint32_t)(hash_pair(l, r) >> (64 - b->mbits));; i = (i + 1) & mask) {
        int32_t m = b->mtab[i];
        if (m < 0) return -1;
        if (b->mleft[m] == l && b->mright[m] == r) return m;
    }
}

static void merge_insert(BPE *b, int32_t m) {
    const uint32_t mask = (1u << b->mbits) - 1;
    for (uint32_t i = (uint32_t)(hash_pair(b->mleft[m], b->mright[m]) >> (64 - b->mbits));; i = (i + 1) & mask) {
        int32_t old = b->mtab[i];
        if (old < 0) {
            b->mtab[i] = m;
            return;
        }
        if (b->mleft[old] == b->mleft[m] && b->mright[old] == b->mright[m]) return; /* first rank wins */
    }
}

/* ------------------------------------------------------------------------------------------------
 * construction
 * ---------------------------------------------------------------------------------------------- */

typedef struct { /* a GGUF string array: item i is raw[start(i) .. start(i + 1) - gap) */
    Py_buffer raw, starts;
    Py_ssize_t n, gap;
} Strings;

static int strings_open(Strings *s, PyObject *raw, PyObject *starts, Py_ssize_t gap) {
    s->gap = gap;
    if (PyObject_GetBuffer(raw, &s->raw, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(starts, &s->starts, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&s->raw);
        return -1;
    }
    if (s->starts.itemsize != 4 && s->starts.itemsize != 8) {
        PyErr_SetString(PyExc_TypeError, "string offsets must be 32- or 64-bit integers");
        PyBuffer_Release(&s->raw);
        PyBuffer_Release(&s->starts);
        return -1;
    }
    s->n = s->starts.len / s->starts.itemsize - 1;
    return 0;
}

static void strings_close(Strings *s) {
    PyBuffer_Release(&s->raw);
    PyBuffer_Release(&s->starts);
}

static uint64_t strings_start(const Strings *s, Py_ssize_t i) {
    return s->starts.itemsize == 4 ? ((const uint32_t *)s->starts.buf)[i] : (uint64_t)((const int64_t *)s->starts.buf)[i];
}

/* item i as a pointer and length; -1 when its offsets fall outside the buffer */
static Py_ssize_t strings_item(const Strings *s, Py_ssize_t i, const uint8_t **p) {
    uint64_t a = strings_start(s, i), e = strings_start(s, i + 1);
    if (e < a + (uint64_t)s->gap || e - (uint64_t)s->gap > (uint64_t)s->raw.len) return -1;
    *p = (const uint8_t *)s->raw.buf + a;
    return (Py_ssize_t)(e - s->gap - a);
}

static int build_vocab(BPE *b, const Strings *tok) {
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < tok->n; i++) {
        const uint8_t *p;
        Py_ssize_t len = strings_item(tok, i, &p);
        if (len < 0) return -1;
        total += (uint64_t)len;
    }
    b->n = (int32_t)tok->n;
    b->vbits = table_bits(tok->n);
    b->blob = malloc(total ? total : 1);
    b->off = malloc(sizeof(uint64_t) * (tok->n + 1));
    b->vtab = malloc(sizeof(int32_t) << b->vbits);
    if (!b->blob || !b->off || !b->vtab) return -2;
    memset(b->vtab, 0xff, sizeof(int32_t) << b->vbits);
    b->nbytes = total + sizeof(uint64_t) * (tok->n + 1) + (sizeof(int32_t) << b->vbits);
    uint64_t at = 0;
    for (Py_ssize_t i = 0; i < tok->n; i++) {
        const uint8_t *p;
        Py_ssize_t len = strings_item(tok, i, &p), k = unmap(p, len, b->blob + at);
        b->off[i] = at;
        if (k >= 0) at += (uint64_t)k;
        b->off[i + 1] = at;
        if (k > 0) vocab_insert(b, (int32_t)i);
    }
    for (int c = 0; c < 256; c++) {
        uint8_t byte = (uint8_t)c;
        b->byte_id[c] = vocab_find(b, &byte, 1);
    }
    return 0;
}

/* one "left right" merge as token ids; 0 when a side or the result is not a token */
static int merge_ids(const BPE *b, const uint8_t *s, Py_ssize_t n, uint8_t *buf, int32_t ids[3]) {
    const uint8_t *sp = memchr(s, ' ', (size_t)n);
    if (!sp || sp == s) return 0; /* a first character that is a space is no byte-level token */
    Py_ssize_t nl = unmap(s, sp - s, buf);
    if (nl <= 0) return 0;
    Py_ssize_t nr = unmap(sp + 1, n - (sp - s) - 1, buf + nl);
    if (nr <= 0) return 0;
    ids[0] = vocab_find(b, buf, nl);
    ids[1] = vocab_find(b, buf + nl, nr);
    ids[2] = vocab_find(b, buf, nl + nr);
    return ids[0] >= 0 && ids[1] >= 0 && ids[2] >= 0;
}

static int build_merges(BPE *b, const Strings *mg) {
    Py_ssize_t longest = 0;
    for (Py_ssize_t i = 0; i < mg->n; i++) {
        const uint8_t *p;
        Py_ssize_t len = strings_item(mg, i, &p);
        if (len < 0) return -1;
        if (len > longest) longest = len;
    }
    b->mbits = table_bits(mg->n);
    b->mleft = malloc(sizeof(int32_t) * (mg->n + 1));
    b->mright = malloc(sizeof(int32_t) * (mg->n + 1));
    b->mout = malloc(sizeof(int32_t) * (mg->n + 1));
    b->mtab = malloc(sizeof(int32_t) << b->mbits);
    uint8_t *buf = malloc((size_t)longest + 1);
    if (!b->mleft || !b->mright || !b->mout || !b->mtab || !buf) {
        free(buf);
        return -2;
    }
    memset(b->mtab, 0xff, sizeof(int32_t) << b->mbits);
    b->nbytes += 3 * sizeof(int32_t) * (mg->n + 1) + (sizeof(int32_t) << b->mbits);
    b->nm = 0;
    for (Py_ssize_t i = 0; i < mg->n; i++) {
        const uint8_t *p;
        int32_t ids[3];
        Py_ssize_t len = strings_item(mg, i, &p);
        if (!merge_ids(b, p, len, buf, ids)) continue; /* unusable merge: skipped, as llama.cpp never applies it */
        b->mleft[b->nm] = ids[0], b->mright[b->nm] = ids[1], b->mout[b->nm] = ids[2];
        merge_insert(b, b->nm++);
    }
    free(buf);
    return 0;
}

static void BPE_dealloc(BPE *b) {
    free(b->blob), free(b->off), free(b->vtab);
    free(b->mleft), free(b->mright), free(b->mout), free(b->mtab);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static int BPE_init(BPE *b, PyObject *args, PyObject *kw) {
    static char *names[] = {"tokens", "token_starts", "token_gap", "merges", "merge_starts", "merge_gap",
                            "ignore_merges", NULL};
    PyObject *traw, *tstarts, *mraw, *mstarts;
    Py_ssize_t tgap, mgap;
    int ignore = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOnOOn|p", names, &traw, &tstarts, &tgap, &mraw, &mstarts, &mgap,
                                     &ignore))
        return -1;
    if (b->blob) {
        PyErr_SetString(PyExc_RuntimeError, "BPE is already built");
        return -1;
    }
    Strings tok, mg;
    if (strings_open(&tok, traw, tstarts, tgap) < 0) return -1;
    if (strings_open(&mg, mraw, mstarts, mgap) < 0) {
        strings_close(&tok);
        return -1;
    }
    int rc = tok.n < 0 || mg.n < 0 || tok.n >= INT32_MAX || mg.n >= INT32_MAX ? -1 : build_vocab(b, &tok);
    if (rc == 0) rc = build_merges(b, &mg);
    strings_close(&tok);
    strings_close(&mg);
    b->ignore_merges = ignore;
    if (rc == -1) PyErr_SetString(PyExc_ValueError, "string array offsets outside its buffer");
    if (rc == -2) PyErr_NoMemory();
    return rc < 0 ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------
 * encoding
 * ---------------------------------------------------------------------------------------------- */

typedef struct { /* per-piece scratch, sized for the longest piece */
    int32_t *sym, *nxt, *prv;
    uint64_t *heap; /* (rank << 32) | symbol position, a binary min-heap */
    Py_ssize_t cap, hn;
} Work;

static void heap_push(Work *w, uint64_t v) {
    Py_ssize_t i = w->hn++;
    while (i > 0 && w->heap[(i - 1) / 2] > v) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = v;
}

static uint64_t heap_pop(Work *w) {
    uint64_t top = w->heap[0], last = w->heap[--w->hn];
    Py_ssize_t i = 0;
    for (;;) {
        Py_ssize_t c = 2 * i + 1;
        if (c >= w->hn) break;
        if (c + 1 < w->hn && w->heap[c + 1] < w->heap[c]) c++;
        if (w->heap[c] >= last) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (w->hn) w->heap[i] = last;
    return top;
}

static void push_pair(const BPE *b, Work *w, int32_t i) { /* the pair (i, next of i), if it merges */
    if (i < 0 || w->nxt[i] < 0) return;
    int32_t r = merge_rank(b, w->sym[i], w->sym[w->nxt[i]]);
    if (r >= 0) heap_push(w, ((uint64_t)r << 32) | (uint32_t)i);
}

static int emit(PyObject *out, int32_t id) {
    PyObject *v = PyLong_FromLong(id);
    int rc = v ? PyList_Append(out, v) : -1;
    Py_XDECREF(v);
    return rc;
}

static int32_t piece_symbols(const BPE *b, Work *w, const uint8_t *s, Py_ssize_t n) {
    int32_t k = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        int32_t id = b->byte_id[s[j]];
        if (id < 0) continue;
        w->sym[k] = id, w->prv[k] = k - 1, w->nxt[k] = k + 1;
        k++;
    }
    if (k) w->nxt[k - 1] = -1;
    return k;
}

static int encode_piece(const BPE *b, Work *w, const uint8_t *s, Py_ssize_t n, PyObject *out) {
    if (b->ignore_merges) {
        int32_t id = vocab_find(b, s, n);
        if (id >= 0) return emit(out, id);
    }
    int32_t k = piece_symbols(b, w, s, n);
    w->hn = 0;
    for (int32_t i = 0; i + 1 < k; i++) push_pair(b, w, i);
    while (w->hn) {
        uint64_t top = heap_pop(w);
        int32_t r = (int32_t)(top >> 32), i = (int32_t)(uint32_t)top, j;
        if (w->sym[i] < 0 || (j = w->nxt[i]) < 0 || merge_rank(b, w->sym[i], w->sym[j]) != r) continue; /* stale */
        w->sym[i] = b->mout[r], w->sym[j] = -1, w->nxt[i] = w->nxt[j];
        if (w->nxt[j] >= 0) w->prv[w->nxt[j]] = i;
        push_pair(b, w, w->prv[i]);
        push_pair(b, w, i);
    }
    for (int32_t i = k ? 0 : -1; i >= 0; i = w->nxt[i])
        if (emit(out, w->sym[i]) < 0) return -1;
    return 0;
}

static int work_reserve(Work *w, Py_ssize_t n) {
    if (n <= w->cap) return 0;
    free(w->sym), free(w->nxt), free(w->prv), free(w->heap);
    w->sym = malloc(sizeof(int32_t) * n), w->nxt = malloc(sizeof(int32_t) * n);
    w->prv = malloc(sizeof(int32_t) * n), w->heap = malloc(sizeof(uint64_t) * 3 * n);
    w->cap = (w->sym && w->nxt && w->prv && w->heap) ? n : 0;
    return w->cap ? 0 : -1;
}

/* item of the pieces list: a str, or a pre-tokenizer's (str, offsets) tuple */
static const uint8_t *piece_utf8(PyObject *item, Py_ssize_t *n) {
    if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) > 0) item = PyTuple_GET_ITEM(item, 0);
    if (!PyUnicode_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "pieces must be str or (str, offsets) tuples");
        return NULL;
    }
    return (const uint8_t *)PyUnicode_AsUTF8AndSize(item, n);
}

static PyObject *BPE_encode(BPE *b, PyObject *pieces) {
    PyObject *seq = PySequence_Fast(pieces, "encode() takes a sequence of pieces");
    if (!seq) return NULL;
    PyObject *out = PyList_New(0);
    Work w = {0};
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; out && i < count; i++) {
        Py_ssize_t n;
        const uint8_t *s = piece_utf8(PySequence_Fast_GET_ITEM(seq, i), &n);
        if (s && work_reserve(&w, n > 0 ? n : 1) < 0) {
            PyErr_NoMemory();
            s = NULL;
        }
        if (!s || encode_piece(b, &w, s, n, out) < 0) Py_CLEAR(out);
    }
    free(w.sym), free(w.nxt), free(w.prv), free(w.heap);
    Py_DECREF(seq);
    return out;
}

static PyObject *BPE_nbytes(BPE *b, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(b->nbytes);
}

static PyObject *BPE_n_merges(BPE *b, void *closure) {
    (void)closure;
    return PyLong_FromLong(b->nm);
}

static PyMethodDef BPE_methods[] = {
    {"encode", (PyCFunction)BPE_encode, METH_O,
     "encode(pieces) -> token ids: each piece (a str, or a (str, offsets) tuple) merged on its own"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef BPE_getset[] = {
    {"nbytes", (getter)BPE_nbytes, NULL, "bytes held by the tables", NULL},
    {"n_merges", (getter)BPE_n_merges, NULL, "merges whose tokens are all in the vocabulary", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BPEType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vramfit.runtime._bpe.BPE",
    .tp_basicsize = sizeof(BPE),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BPE(tokens, token_starts, token_gap, merges, merge_starts, merge_gap, ignore_merges=False)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)BPE_init,
    .tp_dealloc = (destructor)BPE_dealloc,
    .tp_methods = BPE_methods,
    .tp_getset = BPE_getset,
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_bpe", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__bpe(void) {
    init_alphabet();
    if (PyType_Ready(&BPEType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m && PyModule_AddObjectRef(m, "BPE", (PyObject *)&BPEType) < 0) Py_CLEAR(m);
    return m;
}
