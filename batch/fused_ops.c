/* Two ONNX Runtime custom operators (domain "ai.ncf") for the CPU path of `ncf score`.
 *
 * ReluTower runs the ReLU part of the grid graph's MLP tower for a batch of users against
 * every candidate in one pass. The plain grid graph computes, per user b and candidate i
 * (layout [B, L, N]):
 *     x1 = max(item[:, i], floor1[b])              (relu(z + c) = max(z, -c) + c, see export)
 *     x_j = max(W_j x_{j-1}, floor_j[b])           for each further layer j
 *     out[b, 0, i] = h . x_last
 * as a chain of separate ONNX operators, each of which writes its [B, L, N] intermediate to
 * memory and reads it back. This kernel computes the same expression for a block of 16
 * candidates at a time with the block's activations in registers and L1, so per pair only the
 * item column is read and one float is written. Same operations and the same order of the
 * products within each dot product, up to float rounding of the sums.
 *   Inputs:  0 item    float [L1, N]         the item half of the first layer (cols-first)
 *            1 floors  float [B, F]          per user: floor1 (L1 values), floor2 (L2), ...
 *            2 dims    int64 [nl]            L1, L2, ..., L_last
 *            3 weights float [sum L_j L_j-1] W2, W3, ... row-major, concatenated
 *            4 h       float [L_last]
 *   Output:  0 out     float [B, 1, N]
 *
 * MaskedTopK replaces ScatterND(-inf at the excluded pairs) followed by TopK: the same k best
 * per row, in the same order (higher logit first, lower candidate position on ties).
 *   Inputs:  0 logits float [B, N], 1 exclude int64 [S, 2] of (row, position), 2 k int64 [1]
 *   Outputs: 0 logit float [B, k], 1 position int64 [B, k]
 *
 * Built on first use by batch/fused.py with the machine's own compiler and -march=native, and
 * self-checked against numpy before use. The ONNX Runtime C ABI is used directly: the slots of
 * the OrtApi function table are stable by position (the table is append-only across
 * releases), and the OrtCustomOp layout below is that of API version 13, which every later
 * runtime accepts. Inputs whose shapes do not fit leave the outputs unset, so ONNX Runtime
 * fails the run rather than a kernel reading out of bounds.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WIDTH 256 /* widest layer; batch/fused.py does not fuse wider towers */
#define BLOCK 16      /* candidates per block: two 8-float vectors */

/* ------------------------------------------------------------------ the ONNX Runtime ABI */

typedef void *Status; /* OrtStatus*, NULL on success */
typedef void (*ApiSlot)(void); /* a slot of the table; cast to its real type to call it */
typedef struct {
    const ApiSlot *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} ApiBase;

enum { /* positions in the OrtApi table */
    CREATE_CUSTOM_OP_DOMAIN = 26,
    CUSTOM_OP_DOMAIN_ADD = 27,
    ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51,
    GET_DIMENSIONS_COUNT = 61,
    GET_DIMENSIONS = 62,
    GET_TENSOR_TYPE_AND_SHAPE = 65,
    KERNEL_CONTEXT_GET_INPUT = 90,
    KERNEL_CONTEXT_GET_OUTPUT = 91,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};
#define API_VERSION 13
#define TYPE_FLOAT 1
#define TYPE_INT64 7

typedef Status (*CreateDomainFn)(const char *, void **);
typedef Status (*DomainAddFn)(void *, const void *);
typedef Status (*AddDomainFn)(void *, void *);
typedef Status (*MutableDataFn)(const void *, void **);
typedef Status (*DimsCountFn)(const void *, size_t *);
typedef Status (*DimsFn)(const void *, int64_t *, size_t);
typedef Status (*TypeAndShapeFn)(const void *, void **);
typedef Status (*GetInputFn)(const void *, size_t, const void **);
typedef Status (*GetOutputFn)(void *, size_t, const int64_t *, size_t, void **);
typedef void (*ReleaseFn)(void *);

typedef struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CustomOp *, const ApiSlot *, const void *);
    const char *(*GetName)(const struct CustomOp *);
    const char *(*GetExecutionProviderType)(const struct CustomOp *);
    int (*GetInputType)(const struct CustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct CustomOp *);
    int (*GetOutputType)(const struct CustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct CustomOp *);
    void (*KernelCompute)(void *, void *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct CustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct CustomOp *, size_t);
    int (*GetInputMemoryType)(const struct CustomOp *, size_t);
} CustomOp;

/* ------------------------------------------------------------------ the kernel */

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 splat(float s) { v8 v = {s, s, s, s, s, s, s, s}; return v; }
#ifdef __AVX__
#include <immintrin.h>
static inline v8 vmax(v8 a, v8 b) { return (v8)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline v8 vmax(v8 a, v8 b) { v8i m = a > b; return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }
#endif

/* out[o] = max(sum_j W[o][j] in[j], floor[o]) for one block; rows of in/out are two halves */
static inline __attribute__((always_inline)) void layer(const float *W, const float *floor, int din, int dout,
                                                       const v8 *in, v8 *out) {
    int o = 0;
    for (; o + 4 <= dout; o += 4) {
        const float *w0 = W + (size_t)o * din, *w1 = w0 + din, *w2 = w1 + din, *w3 = w2 + din;
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (int j = 0; j < din; j++) {
            v8 x = in[2 * j], y = in[2 * j + 1], s;
            s = splat(w0[j]); a0 += s * x; b0 += s * y;
            s = splat(w1[j]); a1 += s * x; b1 += s * y;
            s = splat(w2[j]); a2 += s * x; b2 += s * y;
            s = splat(w3[j]); a3 += s * x; b3 += s * y;
        }
        v8 f;
        f = splat(floor[o]);     out[2 * o] = vmax(a0, f);     out[2 * o + 1] = vmax(b0, f);
        f = splat(floor[o + 1]); out[2 * o + 2] = vmax(a1, f); out[2 * o + 3] = vmax(b1, f);
        f = splat(floor[o + 2]); out[2 * o + 4] = vmax(a2, f); out[2 * o + 5] = vmax(b2, f);
        f = splat(floor[o + 3]); out[2 * o + 6] = vmax(a3, f); out[2 * o + 7] = vmax(b3, f);
    }
    for (; o < dout; o++) {
        v8 a = {0}, b = {0};
        for (int j = 0; j < din; j++) {
            v8 s = splat(W[(size_t)o * din + j]);
            a += s * in[2 * j];
            b += s * in[2 * j + 1];
        }
        v8 f = splat(floor[o]);
        out[2 * o] = vmax(a, f);
        out[2 * o + 1] = vmax(b, f);
    }
}

void ncf_relu_tower(const float *item, int64_t n, const float *floors, int64_t n_users, int64_t floor_stride,
                    const int64_t *dims, int64_t n_layers, const float *weights, const float *h, float *out) {
    v8 block[2 * MAX_WIDTH], buf0[2 * MAX_WIDTH], buf1[2 * MAX_WIDTH];
    const int64_t d0 = dims[0], last = dims[n_layers - 1];
    /* candidates outer, users inner: a block of the item table is read from memory once per
       call, not once per user */
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        const int m = n - i0 < BLOCK ? (int)(n - i0) : BLOCK;
        for (int64_t j = 0; j < d0; j++) {
            float tail[BLOCK] = {0};
            const float *src = item + j * n + i0;
            if (m < BLOCK) {
                memcpy(tail, src, (size_t)m * sizeof(float));
                src = tail;
            }
            memcpy(&block[2 * j], src, 2 * sizeof(v8));
        }
        for (int64_t b = 0; b < n_users; b++) {
            const float *fl = floors + b * floor_stride;
            for (int64_t j = 0; j < d0; j++) {
                v8 f = splat(fl[j]);
                buf0[2 * j] = vmax(block[2 * j], f);
                buf0[2 * j + 1] = vmax(block[2 * j + 1], f);
            }
            v8 *in = buf0, *next = buf1;
            const float *W = weights, *f = fl + d0;
            for (int64_t l = 1; l < n_layers; l++) {
                layer(W, f, (int)dims[l - 1], (int)dims[l], in, next);
                W += dims[l - 1] * dims[l];
                f += dims[l];
                v8 *t = in; in = next; next = t;
            }
            v8 a = {0}, c = {0};
            for (int64_t j = 0; j < last; j++) {
                v8 s = splat(h[j]);
                a += s * in[2 * j];
                c += s * in[2 * j + 1];
            }
            float res[BLOCK];
            memcpy(res, &a, sizeof a);
            memcpy(res + 8, &c, sizeof c);
            memcpy(out + b * n + i0, res, (size_t)m * sizeof(float));
        }
    }
}

/* ------------------------------------------------------------------ masked top-k */

typedef struct {
    float v;
    int64_t i;
} Pair;

/* a ranks before b: higher logit first, the lower candidate position on ties (the order of
   ONNX TopK, which the scorer relies on). Positions are distinct, so this is a strict order. */
static inline int before(Pair a, Pair b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }

static int rank_order(const void *a, const void *b) {
    return before(*(const Pair *)a, *(const Pair *)b) ? -1 : before(*(const Pair *)b, *(const Pair *)a);
}

/* Move the k best of p[0..n) to p[0..k) (in no particular order): quickselect. */
static void select_best(Pair *p, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const Pair pivot = p[lo + (hi - lo) / 2];
        int64_t a = lo, b = hi;
        while (a <= b) {
            while (before(p[a], pivot)) a++;
            while (before(pivot, p[b])) b--;
            if (a <= b) { Pair t = p[a]; p[a] = p[b]; p[b] = t; a++; b--; }
        }
        if (k - 1 <= b) hi = b;
        else if (k - 1 >= a) lo = a;
        else return;
    }
}

/* Some of x[0..8) is at least t. */
static inline int any_at_least(const float *x, float t) {
#ifdef __AVX__
    return _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), _mm256_set1_ps(t), _CMP_GE_OQ)) != 0;
#else
    int any = 0;
    for (int j = 0; j < 8; j++) any |= x[j] >= t;
    return any;
#endif
}

/* For each row of x [rows, n] (excluded candidates already -inf): the k best (logit, position)
   in rank order, as ONNX TopK gives them. Two passes per row. The first takes the maximum of
   each of G = 4k (rounded up to 8) interleaved groups of candidates; each is a candidate, so
   the k-th largest of them is a lower bound t of the row's k-th largest, and typically only
   about 1.2k candidates reach it. The second keeps the candidates >= t (blocks of 8 below it
   are skipped with one vector compare) and selects exactly among them. buf holds n + 8. */
static void masked_topk_rows(const float *x, int64_t rows, int64_t n, int64_t k, Pair *buf, float *gm, float *out_v,
                             int64_t *out_i) {
    const int64_t groups = 8 * ((4 * k + 7) / 8);
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * n;
        float t = -__builtin_inff();
        if (groups < n) {
            for (int64_t g = 0; g < groups; g++) gm[g] = -__builtin_inff();
            for (int64_t i0 = 0; i0 < n; i0 += groups) {
                const int64_t m = n - i0 < groups ? n - i0 : groups;
                for (int64_t g = 0; g < m; g++) gm[g] = row[i0 + g] > gm[g] ? row[i0 + g] : gm[g];
            }
            for (int64_t g = 0; g < groups; g++) buf[g] = (Pair){gm[g], g};
            select_best(buf, groups, k);
            t = buf[0].v;
            for (int64_t j = 1; j < k; j++) t = buf[j].v < t ? buf[j].v : t;
        }
        int64_t cnt = 0;
        for (int64_t i0 = 0; i0 < n; i0 += 8) {
            const int64_t m = n - i0 < 8 ? n - i0 : 8;
            if (m == 8 && !any_at_least(row + i0, t)) continue;
            for (int64_t i = i0; i < i0 + m; i++) { /* branch-free append */
                buf[cnt] = (Pair){row[i], i};
                cnt += row[i] >= t;
            }
        }
        if (cnt > k) select_best(buf, cnt, k);
        qsort(buf, (size_t)k, sizeof(Pair), rank_order);
        for (int64_t j = 0; j < k; j++) out_v[r * k + j] = buf[j].v, out_i[r * k + j] = buf[j].i;
    }
}

/* ------------------------------------------------------------------ the operators */

static void *create_kernel(const CustomOp *op, const ApiSlot *api, const void *info) {
    (void)op; (void)info;
    return (void *)api; /* the kernels need nothing but the API table */
}
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static void destroy_kernel(void *kernel) { (void)kernel; }
static int required(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int default_memory(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }

/* Shape of an input value (at most 2 dims are ever needed); returns the rank or -1. */
static int shape_of(const ApiSlot *api, const void *value, int64_t *dims) {
    void *info = NULL;
    size_t rank = 0;
    if (((TypeAndShapeFn)api[GET_TENSOR_TYPE_AND_SHAPE])(value, &info)) return -1;
    int ok = !((DimsCountFn)api[GET_DIMENSIONS_COUNT])(info, &rank) && rank <= 2 &&
             !((DimsFn)api[GET_DIMENSIONS])(info, dims, rank);
    ((ReleaseFn)api[RELEASE_TENSOR_TYPE_AND_SHAPE_INFO])(info);
    return ok ? (int)rank : -1;
}

/* The inputs' values and data; 0 when any cannot be had. */
static int inputs(const ApiSlot *api, void *context, size_t count, const void **in, void **data) {
    for (size_t i = 0; i < count; i++)
        if (((GetInputFn)api[KERNEL_CONTEXT_GET_INPUT])(context, i, &in[i]) ||
            ((MutableDataFn)api[GET_TENSOR_MUTABLE_DATA])(in[i], &data[i]))
            return 0;
    return 1;
}

static void *output(const ApiSlot *api, void *context, size_t index, const int64_t *shape, size_t rank) {
    void *out = NULL, *data = NULL;
    if (((GetOutputFn)api[KERNEL_CONTEXT_GET_OUTPUT])(context, index, shape, rank, &out) ||
        ((MutableDataFn)api[GET_TENSOR_MUTABLE_DATA])(out, &data))
        return NULL;
    return data;
}

/* Inputs whose shapes do not fit leave the outputs unset: ONNX Runtime then fails the run
   instead of a kernel reading out of bounds. */

static const int TOWER_INPUTS[] = {TYPE_FLOAT, TYPE_FLOAT, TYPE_INT64, TYPE_FLOAT, TYPE_FLOAT};
static const char *tower_name(const CustomOp *op) { (void)op; return "ReluTower"; }
static int tower_input_type(const CustomOp *op, size_t i) { (void)op; return TOWER_INPUTS[i]; }
static size_t tower_inputs(const CustomOp *op) { (void)op; return 5; }
static int tower_output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t tower_outputs(const CustomOp *op) { (void)op; return 1; }

static void tower_compute(void *kernel, void *context) {
    const ApiSlot *api = kernel;
    const void *in[5];
    void *data[5];
    int64_t item_shape[2], floor_shape[2], dims_shape[2], weights_shape[2], h_shape[2];
    if (!inputs(api, context, 5, in, data) || shape_of(api, in[0], item_shape) != 2 ||
        shape_of(api, in[1], floor_shape) != 2 || shape_of(api, in[2], dims_shape) != 1 ||
        shape_of(api, in[3], weights_shape) != 1 || shape_of(api, in[4], h_shape) != 1)
        return;
    const int64_t *dims = data[2], nl = dims_shape[0];
    int64_t floors = 0, weights = 0;
    if (nl < 1) return;
    for (int64_t l = 0; l < nl; l++) {
        if (dims[l] < 1 || dims[l] > MAX_WIDTH) return;
        floors += dims[l];
        if (l > 0) weights += dims[l - 1] * dims[l];
    }
    if (item_shape[0] != dims[0] || floor_shape[1] != floors || weights_shape[0] < weights || h_shape[0] != dims[nl - 1])
        return;
    const int64_t out_shape[3] = {floor_shape[0], 1, item_shape[1]};
    float *out = output(api, context, 0, out_shape, 3);
    if (out)
        ncf_relu_tower(data[0], item_shape[1], data[1], floor_shape[0], floor_shape[1], dims, nl, data[3], data[4], out);
}

static const CustomOp RELU_TOWER = {
    API_VERSION, create_kernel, tower_name, op_provider, tower_input_type, tower_inputs, tower_output_type,
    tower_outputs, tower_compute, destroy_kernel, required, required, default_memory,
};

/* MaskedTopK: inputs logits float [B, N], exclude int64 [S, 2] of (row, position), k int64 [1];
   outputs logit float [B, k], position int64 [B, k]. Same as ScatterND(-inf) then TopK. */
static const int TOPK_INPUTS[] = {TYPE_FLOAT, TYPE_INT64, TYPE_INT64};
static const int TOPK_OUTPUTS[] = {TYPE_FLOAT, TYPE_INT64};
static const char *topk_name(const CustomOp *op) { (void)op; return "MaskedTopK"; }
static int topk_input_type(const CustomOp *op, size_t i) { (void)op; return TOPK_INPUTS[i]; }
static size_t topk_inputs(const CustomOp *op) { (void)op; return 3; }
static int topk_output_type(const CustomOp *op, size_t i) { (void)op; return TOPK_OUTPUTS[i]; }
static size_t topk_outputs(const CustomOp *op) { (void)op; return 2; }

static void topk_compute(void *kernel, void *context) {
    const ApiSlot *api = kernel;
    const void *in[3];
    void *data[3];
    int64_t shape[2], ex_shape[2], k_shape[2];
    if (!inputs(api, context, 3, in, data) || shape_of(api, in[0], shape) != 2 ||
        shape_of(api, in[1], ex_shape) != 2 || ex_shape[1] != 2 || shape_of(api, in[2], k_shape) != 1 ||
        k_shape[0] != 1)
        return;
    const int64_t rows = shape[0], n = shape[1], k = *(const int64_t *)data[2], *ex = data[1];
    if (k < 1 || k > n) return;
    for (int64_t s = 0; s < ex_shape[0]; s++)
        if (ex[2 * s] < 0 || ex[2 * s] >= rows || ex[2 * s + 1] < 0 || ex[2 * s + 1] >= n) return;
    const int64_t groups = 8 * ((4 * k + 7) / 8);
    float *x = malloc((size_t)(rows * n) * sizeof(float) + 1), *gm = malloc((size_t)groups * sizeof(float));
    Pair *buf = malloc((size_t)(n + 8 > groups ? n + 8 : groups) * sizeof(Pair));
    const int64_t out_shape[2] = {rows, k};
    float *v = x && gm && buf ? output(api, context, 0, out_shape, 2) : NULL;
    int64_t *ix = v ? output(api, context, 1, out_shape, 2) : NULL;
    if (ix) {
        memcpy(x, data[0], (size_t)(rows * n) * sizeof(float));
        for (int64_t s = 0; s < ex_shape[0]; s++) x[ex[2 * s] * n + ex[2 * s + 1]] = -__builtin_inff();
        masked_topk_rows(x, rows, n, k, buf, gm, v, ix);
    }
    free(x);
    free(gm);
    free(buf);
}

static const CustomOp MASKED_TOPK = {
    API_VERSION, create_kernel, topk_name, op_provider, topk_input_type, topk_inputs, topk_output_type,
    topk_outputs, topk_compute, destroy_kernel, required, required, default_memory,
};

/* The entry point that SessionOptions.register_custom_ops_library looks up. */
Status RegisterCustomOps(void *options, const ApiBase *base) {
    const ApiSlot *api = base->GetApi(API_VERSION);
    void *domain = NULL;
    Status status = ((CreateDomainFn)api[CREATE_CUSTOM_OP_DOMAIN])("ai.ncf", &domain);
    if (!status) status = ((DomainAddFn)api[CUSTOM_OP_DOMAIN_ADD])(domain, &RELU_TOWER);
    if (!status) status = ((DomainAddFn)api[CUSTOM_OP_DOMAIN_ADD])(domain, &MASKED_TOPK);
    if (!status) status = ((AddDomainFn)api[ADD_CUSTOM_OP_DOMAIN])(options, domain);
    return status;
}
