/*
 * spnkernel: StrassenNets' sum-product layer (docs/lutmatmul.md, "The SpnMatMul operator").
 *
 *   h[n, j] = ((0 + X[n, p1]) + X[n, p2] + ...) - X[n, q1] - X[n, q2] - ...
 *             over the inputs p of weight +1 in W_b's row j, ascending, then those q of -1
 *   s[n, j] = h[n, j] * a[j]                         (the layer's only R products per row)
 *   Y[n, m] = (fold of s[n, j] over W_c's row m the same way) + bias[m], then ReLU if relu
 *
 * every operation a float32 add, subtract or multiply, rounded, in that order: no path fuses
 * or reorders them, so every path equals the scalar one (and the numpy reference,
 * lutcompile.ops.spn.kernel_reference) bit for bit.  The ternary weights arrive packed, four
 * to a byte (2 bits each, lowest first: 0 -> 0, 1 -> +1, 2 -> -1; 3 is refused), and the plan
 * keeps each row's nonzero inputs as two ascending index lists, so the work is one add or
 * subtract per nonzero weight and row, the SIMD paths doing 8 (AVX2) or 16 (AVX-512) rows a
 * step.  Paths as lutkernel.h's: LUT_PATH_AUTO honours LUTCOMPILE_KERNEL_PATH.
 *
 * With activations = 1 (docs/lutmatmul.md, "uint8 activations") each product's input row is
 * quantised to 8 bits (lo = its minimum, step = (max - lo) / 255, q = rint((v - lo) / step)),
 * the ternary product is an exact int32 sum of q times the int8 weights, and the output is
 * step * float(acc) + lo * float(row sum of the weights); rows holding NaN or inf, or whose
 * max - lo overflows, give NaN.  Every float step is the spec's, in its order, so every path
 * (scalar; AVX2 maddubs / madd; AVX-512 vpdpbusd) equals kernel_reference bit for bit.
 */
#ifndef SPNKERNEL_H
#define SPNKERNEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct spn_plan spn_plan;

/* Bytes a packed ternary matrix of `rows` x `cols` takes: rows * ceil(cols / 4). */
int64_t spn_packed_bytes(int64_t rows, int64_t cols);

/* With activations = 1, D and R are at most this: int32 sums of up to 2^23 products of 255. */
#define SPN_UINT8_MAX_INPUTS ((int64_t)1 << 23)

/* Validates everything (1 <= D, M, R <= 2^31 - 1 and R * max(D, M) <= 2^36; the packed sizes;
 * no code 3, nor set bits past a row's end; a and bias finite; relu 0 or 1; activations 0
 * (float32) or 1 (uint8, then D, R <= SPN_UINT8_MAX_INPUTS)) and copies what it keeps; LUT_OK,
 * or LUT_EINVAL / LUT_ENOMEM with a message. */
int spn_plan_create(spn_plan **out, int64_t D, int64_t M, int64_t R, const uint8_t *wb, int64_t n_wb,
                    const float *a, int64_t n_a, const uint8_t *wc, int64_t n_wc, const float *bias,
                    int64_t n_bias, int64_t relu, int64_t activations, char *err, size_t errlen);

void spn_plan_destroy(spn_plan *plan);

/* Y[N][M] from row-major X[N][D] on `path` (as lut_resolve_path takes it). */
int spn_apply(const spn_plan *plan, const float *X, int64_t N, float *Y, int path, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* SPNKERNEL_H */
