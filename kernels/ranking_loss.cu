// The all-pairs ranking-utility loss of the whole batch in one launch (one block per
// prompt), computed in f64 like the CPU reference (src/loss.rs): rewards r = sigmoid(logit),
// for every ranked pair i < j of a prompt (best first) the loss is -U(r_i - r_j) with the
// prompt's utility, averaged over all pairs of the batch (`scale` = 1 / pair count).
#include "common.cuh"

// Utility ids, in the order of rcx::loss::Utility (the Rust side maps them).
#define UTILITY_X 0
#define UTILITY_X2 1
#define UTILITY_LOG 2
#define UTILITY_X_INV 3
#define UTILITY_X_INV2 4
#define UTILITY_LOGSIGMOID 5
#define UTILITY_POWER 6
#define UTILITY_NEG_POWER 7

// U(x) and U'(x) of the extended (eps-shifted, linearly continued) utilities, exactly as
// Utility::value_and_slope (eps > 0 here: the training loss).
__device__ void value_and_slope(int utility, double g, double x, double eps, double* u, double* slope) {
    switch (utility) {
        case UTILITY_X:
            *u = x;
            *slope = 1.0;
            return;
        case UTILITY_LOGSIGMOID: {
            // ln sigmoid(4x) = -softplus(-4x), finite for large |x|.
            const double z = -4.0 * x;
            const double softplus = z > 0.0 ? z + log1p(exp(-z)) : log1p(exp(z));
            const double sig = 1.0 / (1.0 + exp(-4.0 * x));
            *u = -softplus;
            *slope = 4.0 * (1.0 - sig);
            return;
        }
        case UTILITY_X2:
            if (x > 0.0) {
                *u = (x + eps) * (x + eps) - eps * eps;
                *slope = 2.0 * (x + eps);
            } else {
                *u = x;
                *slope = 1.0;
            }
            return;
        case UTILITY_LOG:
            if (x > 0.0) {
                *u = log(x + eps) - log(eps);
                *slope = 1.0 / (x + eps);
            } else {
                *u = 10.0 * x;
                *slope = 10.0;
            }
            return;
        case UTILITY_X_INV:
            if (x > 0.0) {
                *u = 1.0 / eps - 1.0 / (x + eps);
                *slope = 1.0 / ((x + eps) * (x + eps));
            } else {
                *u = 100.0 * x;
                *slope = 100.0;
            }
            return;
        case UTILITY_X_INV2:
            if (x > 0.0) {
                const double s = x + eps;
                *u = 1.0 / (eps * eps) - 1.0 / (s * s);
                *slope = 2.0 / (s * s * s);
            } else {
                *u = x;
                *slope = 1.0;
            }
            return;
        case UTILITY_POWER:
            if (x > 0.0) {
                *u = pow(x + eps, g) - pow(eps, g);
                *slope = g * pow(x + eps, g - 1.0);
            } else {
                *slope = g * pow(eps, g - 1.0);
                *u = *slope * x;
            }
            return;
        default:  // UTILITY_NEG_POWER
            if (x > 0.0) {
                *u = pow(eps, -g) - pow(x + eps, -g);
                *slope = g * pow(x + eps, -g - 1.0);
            } else {
                *slope = g * pow(eps, -g - 1.0);
                *u = *slope * x;
            }
            return;
    }
}

__device__ __forceinline__ double sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    const double e = exp(x);
    return e / (1.0 + e);
}

// logits, dlogits [sum_p K_p]; offsets [P+1] (prompt p owns offsets[p]..offsets[p+1]);
// utility, exponent [P] (exponent is g of power:g / neg_power:g, unused otherwise).
// prompt_loss[p] = sum over the prompt's pairs of -U (not scaled); dlogits = d(mean loss)/d
// logit, overwritten. Thread m of block p owns completion m: it sums its pair terms in the
// CPU's order (pairs where it is ranked below first, then above), so no atomics are needed.
extern "C" __global__ void ranking_loss_forward_backward(double* prompt_loss, float* dlogits, const float* logits,
                                                         const int* offsets, const int* utility,
                                                         const double* exponent, double eps, double scale) {
    const int p = blockIdx.x;
    const int start = offsets[p], k = offsets[p + 1] - offsets[p];
    const int u_id = utility[p];
    const double g = exponent[p];
    double loss = 0.0;
    for (int m = threadIdx.x; m < k; m += blockDim.x) {
        const double r_m = sigmoid((double)logits[start + m]);
        double dr = 0.0;
        for (int j = 0; j < k; j++) {
            if (j == m) continue;
            const double r_j = sigmoid((double)logits[start + j]);
            double u, slope;
            if (j < m) {
                // j is ranked above m: the pair's x = r_j - r_m grows as r_m falls.
                value_and_slope(u_id, g, r_j - r_m, eps, &u, &slope);
                dr += slope * scale;
            } else {
                value_and_slope(u_id, g, r_m - r_j, eps, &u, &slope);
                dr -= slope * scale;
                loss -= u;
            }
        }
        dlogits[start + m] = (float)(dr * r_m * (1.0 - r_m));
    }
    loss = block_sum(loss);
    if (threadIdx.x == 0) prompt_loss[p] = loss;
}
