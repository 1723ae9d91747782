/* ReluTower: an ONNX Runtime custom operator (domain "ai.ncf") that runs the ReLU part of the
 * grid graph's MLP tower for a batch of users against every candidate in one pass.
 *
 * The plain grid graph computes, per user b and candidate i (layout [B, L, N]):
 *     x1 = max(item[:, i], floor1[b])              (relu(z + c) = max(z, -c) + c, see export)
 *     x_j = max(W_j x_{j-1}, floor_j[b])           for each further layer j
 *     out[b, 0, i] = h . x_last
 * as a chain of separate ONNX operators, each of which writes its [B, L, N] intermediate to
 * memory and reads it back. This kernel computes the same expression for a block of 16
 * candidates at a time with the block's activations in registers and L1, so per pair only the
 * item column is read and one float is written. Same operations, same order of the products
 * within each dot product up to float rounding of the sums.
 *
 * Inputs:  0 item    float [L1, N]         the item half of the first layer (cols-first)
 *          1 floors  float [B, F]          per user: floor1 (L1 values), floor2 (L2), ...
 *          2 dims    int64 [nl + 1]        L1, L2, ..., L_last
 *          3 weights float [sum L_j L_j-1] W2, W3, ... row-major, concatenated
 *          4 h       float [L_last]
 * Output:  0 out     float [B, 1, N]
 *
 * Built on first use by batch/fused.py with the machine's own compiler and -march=native.
 * The ONNX Runtime C ABI is used directly: the slots of the OrtApi function table are stable
 * by position (the table is append-only across releases), and the OrtCustomOp layout below is
 * that of API version 13, which every later runtime accepts.
 */
#include <stddef.h>
#include <stdint.h>
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

/* ------------------------------------------------------------------ the operator */

static const int INPUT_TYPES[] = {TYPE_FLOAT, TYPE_FLOAT, TYPE_INT64, TYPE_FLOAT, TYPE_FLOAT};

static void *create_kernel(const CustomOp *op, const ApiSlot *api, const void *info) {
    (void)op; (void)info;
    return (void *)api; /* the kernel needs nothing but the API table */
}
static const char *op_name(const CustomOp *op) { (void)op; return "ReluTower"; }
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const CustomOp *op, size_t i) { (void)op; return INPUT_TYPES[i]; }
static size_t input_count(const CustomOp *op) { (void)op; return 5; }
static int output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 1; }
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

static void compute(void *kernel, void *context) {
    const ApiSlot *api = kernel;
    const void *in[5];
    void *data[5];
    for (size_t i = 0; i < 5; i++)
        if (((GetInputFn)api[KERNEL_CONTEXT_GET_INPUT])(context, i, &in[i]) ||
            ((MutableDataFn)api[GET_TENSOR_MUTABLE_DATA])(in[i], &data[i]))
            return;
    int64_t item_shape[2], floor_shape[2], dims_shape[2], weights_shape[2], h_shape[2];
    if (shape_of(api, in[0], item_shape) != 2 || shape_of(api, in[1], floor_shape) != 2 ||
        shape_of(api, in[2], dims_shape) != 1 || shape_of(api, in[3], weights_shape) != 1 ||
        shape_of(api, in[4], h_shape) != 1)
        return;
    /* shapes that do not fit the tower leave the output unset: ONNX Runtime then fails the run
       instead of this kernel reading out of bounds */
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
    void *out = NULL, *out_data = NULL;
    if (((GetOutputFn)api[KERNEL_CONTEXT_GET_OUTPUT])(context, 0, out_shape, 3, &out) ||
        ((MutableDataFn)api[GET_TENSOR_MUTABLE_DATA])(out, &out_data))
        return;
    ncf_relu_tower(data[0], item_shape[1], data[1], floor_shape[0], floor_shape[1], dims, nl, data[3], data[4],
                   out_data);
}

static const CustomOp RELU_TOWER = {
    API_VERSION, create_kernel, op_name, op_provider, input_type, input_count, output_type, output_count,
    compute, destroy_kernel, required, required, default_memory,
};

/* The entry point that SessionOptions.register_custom_ops_library looks up. */
Status RegisterCustomOps(void *options, const ApiBase *base) {
    const ApiSlot *api = base->GetApi(API_VERSION);
    void *domain = NULL;
    Status status = ((CreateDomainFn)api[CREATE_CUSTOM_OP_DOMAIN])("ai.ncf", &domain);
    if (!status) status = ((DomainAddFn)api[CUSTOM_OP_DOMAIN_ADD])(domain, &RELU_TOWER);
    if (!status) status = ((AddDomainFn)api[ADD_CUSTOM_OP_DOMAIN])(options, domain);
    return status;
}
