#include "kernels/device_lsq_kernels.cuh"

#include <cfloat>

namespace kvcompact::kernels {
namespace {

constexpr int kBlock = 256;

struct Sum {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct Max {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Reduces `v` over the block; every thread gets the result. Uses `shared[32]`.
template <typename Op>
__device__ double BlockReduce(double v, double* shared, Op op, double identity) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : identity;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffff, v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

__device__ double Clamp(double x, double lo, double hi) { return fmin(fmax(x, lo), hi); }
__device__ double* Vec(const LsqProblem& p, int which) { return p.vec + which * p.t; }

__global__ void PrepareKernel(const LsqProblem* problems, LsqState* states) {
  __shared__ double shared[32];
  const LsqProblem p = problems[blockIdx.x];
  double trace = 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    const double g = p.gram[j * p.t + j];
    trace += g;
    Vec(p, kLsqInvDiag)[j] = 1.0 / fmax(g, 1e-300);
    Vec(p, kLsqSol)[j] = Vec(p, kLsqRhs)[j];
    Vec(p, kLsqFree)[j] = 1.0;
    Vec(p, kLsqPos)[j] = static_cast<double>(j);
  }
  trace = BlockReduce(trace, shared, Sum(), 0.0);
  if (threadIdx.x == 0) {
    LsqState s;
    s.lipschitz = fmax(trace, 1e-300);
    s.jitter = 1e-12 * (trace / fmax(double(p.t), 1.0) + 1e-300);
    s.nfree = static_cast<int>(p.t);
    states[blockIdx.x] = s;
  }
}

__global__ void StartKernel(const LsqProblem* problems, const int* info) {
  __shared__ double shared[32];
  const LsqProblem p = problems[blockIdx.x];
  double bad = 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) bad += isfinite(Vec(p, kLsqSol)[j]) ? 0.0 : 1.0;
  const bool use_solution = info[blockIdx.x] == 0 && BlockReduce(bad, shared, Sum(), 0.0) == 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    Vec(p, kLsqW)[j] = Clamp(use_solution ? Vec(p, kLsqSol)[j] : 1.0, p.lo, p.hi);
  }
}

__global__ void AnalyzeKernel(const LsqProblem* problems, LsqState* states, double tolerance) {
  __shared__ double shared[32];
  const LsqProblem p = problems[blockIdx.x];
  LsqState* state = states + blockIdx.x;
  if (state->status != kLsqActive) return;
  const double *w = Vec(p, kLsqW), *g = Vec(p, kLsqGrad), *inv = Vec(p, kLsqInvDiag), *c = Vec(p, kLsqRhs);
  double pg = 0, wmax = 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    pg = fmax(pg, fabs(w[j] - Clamp(w[j] - g[j] * inv[j], p.lo, p.hi)));
    wmax = fmax(wmax, fabs(w[j]));
  }
  pg = BlockReduce(pg, shared, Max(), 0.0);
  wmax = BlockReduce(wmax, shared, Max(), 0.0);
  if (pg <= tolerance * fmax(1.0, wmax)) {
    if (threadIdx.x == 0) state->status = kLsqConverged;
    return;
  }
  // Epsilon-binding set: at (or within eps of) a bound with the gradient pushing outward. Each
  // thread takes a contiguous run of variables, so that the free ones are numbered in order.
  const double eps = fmin(pg, 1e-3 * (p.hi - p.lo));
  const int64_t per_thread = (p.t + blockDim.x - 1) / blockDim.x;
  const int64_t begin = threadIdx.x * per_thread, end = begin + per_thread < p.t ? begin + per_thread : p.t;
  double trace = 0, f = 0;
  int count = 0;
  for (int64_t j = begin; j < end; ++j) {
    const bool at_lo = w[j] <= p.lo + eps && g[j] > 0;
    const bool at_hi = w[j] >= p.hi - eps && g[j] < 0;
    const bool is_free = !at_lo && !at_hi;
    Vec(p, kLsqFree)[j] = is_free ? 1.0 : 0.0;
    if (is_free) {
      trace += p.gram[j * p.t + j];
      ++count;
    }
    f += 0.5 * w[j] * g[j] - 0.5 * w[j] * c[j];  // 0.5 w'Gw - c'w with G w = g + c
  }
  // Exclusive scan of the threads' counts (blockDim.x <= 1024).
  __shared__ int offsets[1024];
  offsets[threadIdx.x] = count;
  __syncthreads();
  for (int step = 1; step < blockDim.x; step <<= 1) {
    const int add = threadIdx.x >= step ? offsets[threadIdx.x - step] : 0;
    __syncthreads();
    offsets[threadIdx.x] += add;
    __syncthreads();
  }
  int next = offsets[threadIdx.x] - count;
  for (int64_t j = begin; j < end; ++j) {
    if (Vec(p, kLsqFree)[j] != 0) {
      Vec(p, kLsqPos)[j] = next;
      Vec(p, kLsqSol)[next] = -g[j];
      ++next;
    }
  }
  const double nfree = offsets[blockDim.x - 1];
  trace = BlockReduce(trace, shared, Sum(), 0.0);
  f = BlockReduce(f, shared, Sum(), 0.0);
  if (threadIdx.x == 0) {
    state->nfree = static_cast<int>(nfree);
    state->jitter = 1e-13 * (trace / fmax(nfree, 1.0) + 1e-300);
    state->f0 = f;
    state->alpha = 1;
    state->searching = 1;
    state->moved = 0;
  }
}

__global__ void BuildSystemKernel(const LsqProblem* problems, const LsqState* states) {
  const LsqProblem p = problems[blockIdx.y];
  const LsqState& s = states[blockIdx.y];
  if (s.status != kLsqActive) return;
  const double *is_free = Vec(p, kLsqFree), *pos = Vec(p, kLsqPos);
  const int64_t n = p.t * p.t, nf = s.nfree;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t a = e / p.t, b = e % p.t;
    if (is_free[a] == 0 || is_free[b] == 0) continue;
    p.system[static_cast<int64_t>(pos[a]) * nf + static_cast<int64_t>(pos[b])] = a == b ? p.gram[e] + s.jitter : p.gram[e];
  }
}

__global__ void DirectionKernel(const LsqProblem* problems, const LsqState* states, const int* info) {
  __shared__ double shared[32];
  const LsqProblem p = problems[blockIdx.x];
  const LsqState& s = states[blockIdx.x];
  if (s.status != kLsqActive) return;
  const double *sol = Vec(p, kLsqSol), *is_free = Vec(p, kLsqFree), *pos = Vec(p, kLsqPos), *g = Vec(p, kLsqGrad),
               *inv = Vec(p, kLsqInvDiag);
  double bad = 0;
  for (int64_t j = threadIdx.x; j < s.nfree; j += blockDim.x) bad += isfinite(sol[j]) ? 0.0 : 1.0;
  // A failed factorisation (not positive definite) or a non-finite step: scaled gradient everywhere.
  const bool newton = s.nfree > 0 && info[blockIdx.x] == 0 && BlockReduce(bad, shared, Sum(), 0.0) == 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    Vec(p, kLsqDir)[j] = newton && is_free[j] != 0 ? sol[static_cast<int64_t>(pos[j])] : -g[j] * inv[j];
  }
}

__global__ void TrialKernel(const LsqProblem* problems, const LsqState* states) {
  const LsqProblem p = problems[blockIdx.x];
  const LsqState& s = states[blockIdx.x];
  if (s.status != kLsqActive || !s.searching) return;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    Vec(p, kLsqTrial)[j] = Clamp(Vec(p, kLsqW)[j] + s.alpha * Vec(p, kLsqDir)[j], p.lo, p.hi);
  }
}

__global__ void AcceptKernel(const LsqProblem* problems, LsqState* states) {
  __shared__ double shared[32];
  __shared__ int accept;
  const LsqProblem p = problems[blockIdx.x];
  LsqState* s = states + blockIdx.x;
  if (s->status != kLsqActive || !s->searching) return;
  const double *trial = Vec(p, kLsqTrial), *gt = Vec(p, kLsqGt), *c = Vec(p, kLsqRhs), *g = Vec(p, kLsqGrad);
  double* w = Vec(p, kLsqW);
  double f = 0, armijo = 0, move = 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    f += 0.5 * trial[j] * gt[j] - c[j] * trial[j];
    armijo += g[j] * (w[j] - trial[j]);
    move = fmax(move, fabs(trial[j] - w[j]));
  }
  f = BlockReduce(f, shared, Sum(), 0.0);
  armijo = BlockReduce(armijo, shared, Sum(), 0.0);
  move = BlockReduce(move, shared, Max(), 0.0);
  if (threadIdx.x == 0) {
    const double decrease = s->f0 - f;
    accept = decrease >= 1e-4 * armijo && decrease >= 0;
    if (accept) {
      s->moved = move > 0;
      s->searching = 0;
    } else {
      s->alpha *= 0.5;
    }
  }
  __syncthreads();
  if (accept) {
    for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) w[j] = trial[j];
  }
}

__global__ void GradientStepKernel(const LsqProblem* problems, const LsqState* states) {
  const LsqProblem p = problems[blockIdx.x];
  const LsqState& s = states[blockIdx.x];
  if (s.status != kLsqActive || s.moved) return;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    Vec(p, kLsqW)[j] = Clamp(Vec(p, kLsqW)[j] - Vec(p, kLsqGrad)[j] / s.lipschitz, p.lo, p.hi);
  }
}

__global__ void CastToDoubleKernel(const float* in, int64_t count, double* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = in[i];
  }
}


// --- The accelerated solver (core/bounded_lsq.cc SolveBoundedLsqAccelerated) ---

__global__ void AccPrepareKernel(const LsqProblem* problems, LsqState* states) {
  const LsqProblem p = problems[blockIdx.x];
  double *s = Vec(p, kLsqInvDiag), *c = Vec(p, kLsqSol), *x = Vec(p, kLsqW), *y = Vec(p, kLsqTrial), *v = Vec(p, kLsqDir);
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    s[j] = sqrt(fmax(p.gram[j * p.t + j], 1e-300));
    c[j] = Vec(p, kLsqRhs)[j] / s[j];
    x[j] = y[j] = Clamp(s[j], p.lo * s[j], p.hi * s[j]);
    v[j] = 1.0;
  }
  if (threadIdx.x == 0) {
    LsqState st;
    st.alpha = 1;      // momentum
    st.lipschitz = 0;  // the power iteration's norm until the last step
    states[blockIdx.x] = st;
  }
}

__global__ void AccScaleKernel(const LsqProblem* problems) {
  const LsqProblem p = problems[blockIdx.y];
  const double* s = Vec(p, kLsqInvDiag);
  float* scaled = reinterpret_cast<float*>(p.system);  // G' in fp32, as the CPU solver holds it
  const int64_t n = p.t * p.t;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    scaled[e] = static_cast<float>(p.gram[e] / (s[e / p.t] * s[e % p.t]));
  }
}

constexpr int kRowsPerBlock = kBlock / 32;

__global__ void AccProductKernel(const LsqProblem* problems, const LsqState* states, int in, int out) {
  const LsqProblem p = problems[blockIdx.y];
  if (states[blockIdx.y].status != kLsqActive) return;
  const int64_t row = blockIdx.x * int64_t(kRowsPerBlock) + (threadIdx.x >> 5);
  if (row >= p.t) return;
  const int lane = threadIdx.x & 31;
  const float* a = reinterpret_cast<const float*>(p.system) + row * p.t;  // symmetric: row = column
  const double* v = Vec(p, in);
  double sum = 0;
  for (int64_t j = lane; j < p.t; j += 32) sum += a[j] * v[j];
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
  if (lane == 0) Vec(p, out)[row] = sum;
}

__global__ void AccPowerStepKernel(const LsqProblem* problems, LsqState* states, bool first, bool last) {
  __shared__ double shared[32];
  const LsqProblem p = problems[blockIdx.x];
  LsqState* st = states + blockIdx.x;
  const bool stopped = st->power_stopped != 0;
  double norm = st->lipschitz;
  const double* gv = Vec(p, kLsqGt);
  double* v = Vec(p, kLsqDir);
  double sq = 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) sq += gv[j] * gv[j];
  const double n = sqrt(BlockReduce(sq, shared, Sum(), 0.0));
  if (!stopped && n > 0) {
    for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) v[j] = gv[j] / n;
    norm = first ? n / sqrt(static_cast<double>(p.t)) : n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    st->lipschitz = norm;
    if (!stopped && !(n > 0)) st->power_stopped = 1;
    if (last) {
      const double t = static_cast<double>(p.t);  // >= trace(G') >= its largest eigenvalue
      st->lipschitz = fmax(norm > 0 ? fmin(1.02 * norm, t) : t, 1e-300);
    }
  }
}

__global__ void AccStepKernel(const LsqProblem* problems, LsqState* states, double tolerance) {
  __shared__ double shared[32];
  const LsqProblem p = problems[blockIdx.x];
  LsqState* st = states + blockIdx.x;
  if (st->status != kLsqActive) return;
  const double step = 1.0 / st->lipschitz, momentum = st->alpha;
  const double *s = Vec(p, kLsqInvDiag), *c = Vec(p, kLsqSol), *gy = Vec(p, kLsqGt);
  double *x = Vec(p, kLsqW), *y = Vec(p, kLsqTrial), *next = Vec(p, kLsqDir);
  double pg = 0, size = 0, turn = 0;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    const double lo = p.lo * s[j], hi = p.hi * s[j], g = gy[j] - c[j], yj = y[j];
    const double n = Clamp(yj - step * g, lo, hi);
    next[j] = n;
    pg = fmax(pg, fabs(yj - Clamp(yj - g, lo, hi)) / s[j]);
    size = fmax(size, fabs(yj) / s[j]);
    turn += (yj - n) * (n - x[j]);
  }
  pg = BlockReduce(pg, shared, Max(), 0.0);
  size = fmax(1.0, BlockReduce(size, shared, Max(), 0.0));
  turn = BlockReduce(turn, shared, Sum(), 0.0);
  const bool converged = pg <= tolerance * size;
  const double next_momentum = 0.5 * (1 + sqrt(1 + 4 * momentum * momentum));
  const bool restart = turn > 0;
  const double coef = (momentum - 1) / next_momentum;
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) {
    const double n = next[j];
    if (!converged) y[j] = restart ? n : n + coef * (n - x[j]);
    x[j] = n;
  }
  if (threadIdx.x == 0) {
    st->iterations += 1;
    if (converged) st->status = kLsqConverged;
    else if (st->iterations >= p.max_iterations) st->status = kLsqStopped;
    else st->alpha = restart ? 1.0 : next_momentum;
  }
}

__global__ void AccFinishKernel(const LsqProblem* problems) {
  const LsqProblem p = problems[blockIdx.x];
  double* x = Vec(p, kLsqW);
  const double* s = Vec(p, kLsqInvDiag);
  for (int64_t j = threadIdx.x; j < p.t; j += blockDim.x) x[j] = Clamp(x[j] / s[j], p.lo, p.hi);
}

dim3 MatrixGrid(int64_t t_max, int count) {
  const int64_t blocks = (t_max * t_max + kBlock * 8 - 1) / (kBlock * 8);
  return dim3(static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks)), static_cast<unsigned>(count));
}

}  // namespace

void LsqPrepare(const LsqProblem* problems, LsqState* states, int count, int64_t t_max, cudaStream_t stream) {
  PrepareKernel<<<count, kBlock, 0, stream>>>(problems, states);
  BuildSystemKernel<<<MatrixGrid(t_max, count), kBlock, 0, stream>>>(problems, states);
}
void LsqStart(const LsqProblem* problems, const int* info, int count, cudaStream_t stream) {
  StartKernel<<<count, kBlock, 0, stream>>>(problems, info);
}
void LsqAnalyze(const LsqProblem* problems, LsqState* states, int count, double tolerance, cudaStream_t stream) {
  AnalyzeKernel<<<count, kBlock, 0, stream>>>(problems, states, tolerance);
}
void LsqBuildSystem(const LsqProblem* problems, const LsqState* states, int count, int64_t t_max, cudaStream_t stream) {
  BuildSystemKernel<<<MatrixGrid(t_max, count), kBlock, 0, stream>>>(problems, states);
}
void LsqDirection(const LsqProblem* problems, const LsqState* states, const int* info, int count, cudaStream_t stream) {
  DirectionKernel<<<count, kBlock, 0, stream>>>(problems, states, info);
}
void LsqTrial(const LsqProblem* problems, const LsqState* states, int count, cudaStream_t stream) {
  TrialKernel<<<count, kBlock, 0, stream>>>(problems, states);
}
void LsqAccept(const LsqProblem* problems, LsqState* states, int count, cudaStream_t stream) {
  AcceptKernel<<<count, kBlock, 0, stream>>>(problems, states);
}
void LsqGradientStep(const LsqProblem* problems, const LsqState* states, int count, cudaStream_t stream) {
  GradientStepKernel<<<count, kBlock, 0, stream>>>(problems, states);
}

void AccPrepare(const LsqProblem* problems, LsqState* states, int count, cudaStream_t stream) {
  AccPrepareKernel<<<count, kBlock, 0, stream>>>(problems, states);
}
void AccScale(const LsqProblem* problems, int count, int64_t t_max, cudaStream_t stream) {
  AccScaleKernel<<<MatrixGrid(t_max, count), kBlock, 0, stream>>>(problems);
}
void AccProduct(const LsqProblem* problems, const LsqState* states, int count, int64_t t_max, int in, int out,
                cudaStream_t stream) {
  const int64_t blocks = (t_max + kRowsPerBlock - 1) / kRowsPerBlock;
  AccProductKernel<<<dim3(static_cast<unsigned>(blocks < 1 ? 1 : blocks), count), kBlock, 0, stream>>>(problems, states,
                                                                                                       in, out);
}
void AccPowerStep(const LsqProblem* problems, LsqState* states, int count, bool first, bool last, cudaStream_t stream) {
  AccPowerStepKernel<<<count, kBlock, 0, stream>>>(problems, states, first, last);
}
void AccStep(const LsqProblem* problems, LsqState* states, int count, double tolerance, cudaStream_t stream) {
  AccStepKernel<<<count, kBlock, 0, stream>>>(problems, states, tolerance);
}
void AccFinish(const LsqProblem* problems, int count, cudaStream_t stream) {
  AccFinishKernel<<<count, kBlock, 0, stream>>>(problems);
}

void CastToDouble(const float* in, int64_t count, double* out, cudaStream_t stream) {
  const int64_t blocks = (count + kBlock * 4 - 1) / (kBlock * 4);
  CastToDoubleKernel<<<static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks)), kBlock, 0, stream>>>(
      in, count, out);
}

}  // namespace kvcompact::kernels
