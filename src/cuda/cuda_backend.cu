// The CUDA backend: weights and KV cache in device memory (fp32, bf16 or fp16 storage, fp32
// accumulation), cuBLAS projections, and the step kernels of decode/step_kernels.cuh. A step
// makes no allocation and no host synchronisation, so the decode benchmark replays a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string_view>
#include <type_traits>

#include "core/blocks.h"
#include "cuda/common/check.h"
#include "cuda/common/gemv.cuh"
#include "cuda/decode/attn_tc_kernel.cuh"
#include "cuda/decode/fused_decode_kernel.cuh"
#include "cuda/decode/select_kernels.cuh"
#include "cuda/decode/short_decode_kernel.cuh"
#include "cuda/decode/step_kernels.cuh"
#include "cuda/prefill/prefill_kernels.cuh"
#include "cuda/prefill/prefill_prepare.cuh"
#include "nsa/backend.h"

namespace nsa {

bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::vector<std::string> cuda_devices() {
  std::vector<std::string> out;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return out;
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    out.push_back(fmt::format("{}: {} (sm_{}{}, {} SMs, {:.1f} GiB)", i, prop.name, prop.major,
                              prop.minor, prop.multiProcessorCount,
                              static_cast<double>(prop.totalGlobalMem) / (1 << 30)));
  }
  return out;
}

namespace {
// Median device time in ms of `enqueue` (work on the default stream) over 10 runs after 2
// warm-ups, timed with events.
template <typename F>
double median_device_ms(F&& enqueue) {
  cudaEvent_t e0, e1;
  NSA_CUDA_CHECK(cudaEventCreate(&e0));
  NSA_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    NSA_CUDA_CHECK(cudaEventRecord(e0));
    enqueue();
    NSA_CUDA_CHECK(cudaEventRecord(e1));
    NSA_CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0.f;
    NSA_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return 0.5 * (ms[4] + ms[5]);
}
}  // namespace

double cuda_copy_bandwidth_gbs() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  NSA_CUDA_CHECK(cudaMalloc(&a, bytes));
  NSA_CUDA_CHECK(cudaMalloc(&b, bytes));
  NSA_CUDA_CHECK(cudaMemset(a, 1, bytes));
  const double ms = median_device_ms(
      [&] { NSA_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
}

namespace cuda {
// Reads n 16-byte words `passes` times (ld.global.cg: L2, not L1, so a small buffer read again
// comes from L2). The sum is stored only if it equals a value it never takes, which keeps the
// loads without writing anything.
__global__ void nsa_read_bandwidth_kernel(const float4* __restrict__ src, int64_t n, int passes,
                                          float* sink) {
  float acc = 0.f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int r = 0; r < passes; ++r) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride) {
      const float4 v = __ldcg(src + i);
      acc += v.x + v.y + v.z + v.w;
    }
  }
  if (acc == -1.f) *sink = acc;  // the buffer holds small positive values
}
}  // namespace cuda

double cuda_read_bandwidth_gbs(size_t bytes, int passes) {
  NSA_CHECK(bytes >= 16 && passes > 0,
            "read bandwidth: need bytes >= 16 and passes > 0, got {} and {}", bytes, passes);
  void* a = nullptr;
  float* sink = nullptr;
  NSA_CUDA_CHECK(cudaMalloc(&a, bytes));
  NSA_CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
  NSA_CUDA_CHECK(cudaMemset(a, 1, bytes));
  int sms = 0;
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t n = static_cast<int64_t>(bytes / 16);
  const double ms = median_device_ms([&] {
    cuda::nsa_read_bandwidth_kernel<<<sms * 4, 512>>>(static_cast<const float4*>(a), n, passes,
                                                      sink);
    NSA_CUDA_CHECK(cudaGetLastError());
  });
  cudaFree(a);
  cudaFree(sink);
  return static_cast<double>(n) * 16 * passes / (ms * 1e-3) / 1e9;
}

namespace {

using cuda::StepParams;

// The integer value of development knob `name` (environment value `value`): all digits, >= 1.
int64_t positive_knob(const char* name, const char* value) {
  int64_t v = 0;
  const std::string_view s(value);
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  NSA_CHECK(ec == std::errc() && end == s.data() + s.size() && v >= 1,
            "{}: value '{}' is not valid; allowed: an integer >= 1", name, value);
  return v;
}

using Clock = std::chrono::steady_clock;
// Host milliseconds since t0 (forward()'s host times).
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// A switch knob ("0" or "1", anything else is an error).
bool flag_knob(const char* name, const char* value) {
  const std::string_view s(value);
  NSA_CHECK(s == "0" || s == "1", "{}: value '{}' is not valid; allowed: 0, 1", name, value);
  return s == "1";
}

// Dynamic shared memory the selection kernel may use on a Hopper GPU (its static arrays take
// ~2 KiB more); smaller devices: their opt-in limit less kStaticSmemMargin (dyn_smem_limit).
constexpr size_t kMaxSelectSmem = size_t{200} << 10;
// The fused decode kernel: dynamic shared memory it may use (its static arrays take ~2 KiB).
constexpr size_t kMaxFusedSmem = size_t{220} << 10;
// The short-context decode kernel: dynamic shared memory it may use (its static arrays are tiny).
constexpr size_t kMaxShortSmem = size_t{220} << 10;
// Room left for a kernel's static shared memory under the device's opt-in limit.
constexpr size_t kStaticSmemMargin = size_t{4} << 10;

// Owning device buffer.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0) NSA_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  void* get() const { return ptr_; }
  template <typename U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct CudaCache : CacheState {
  int64_t cap = 0, cap_cmp = 0;
  // [B, G, cap, dk|dv] each; compressed stream [B, G, cap_cmp, dk|dv]
  DeviceBuffer k_cmp_raw, v_cmp_raw, k_sel, v_sel, k_win, v_win, k_cmp, v_cmp;
  DeviceBuffer len;  // int64 [1], the device copy of `length`

  // The six per-position arrays with their row widths.
  std::array<std::pair<DeviceBuffer*, int64_t>, 6> raw_arrays(int64_t dk, int64_t dv) {
    return {{{&k_cmp_raw, dk},
             {&v_cmp_raw, dv},
             {&k_sel, dk},
             {&v_sel, dv},
             {&k_win, dk},
             {&v_win, dv}}};
  }
};

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      NSA_FAIL("storage dtype {} is not supported by the CUDA backend; allowed: fp32, bf16, fp16",
               to_string(t));
  }
}

// The middle element once sorted (the upper one of an even count); zero for none.
template <typename V>
V upper_median(std::vector<V>& v) {
  if (v.empty()) return V{};
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Host f32 -> storage-type bytes.
std::vector<uint8_t> to_storage(const float* src, int64_t n, DType t) {
  std::vector<uint8_t> out(static_cast<size_t>(n) * dtype_size(t));
  convert_from_f32(src, n, t, out.data());
  return out;
}

// Page-locked host staging buffer (copies from it run at full bus speed); grows, never shrinks.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  void* reserve(size_t bytes) {
    if (bytes > bytes_) {
      if (ptr_) NSA_CUDA_CHECK(cudaFreeHost(ptr_));
      ptr_ = nullptr;
      bytes_ = 0;
      NSA_CUDA_CHECK(cudaMallocHost(&ptr_, bytes));
      bytes_ = bytes;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct PrefillKernels;  // the tiled prefill's kernels for one head-dim pair (below)

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Config& c, const LayerWeights& w, const LayerOptions& o);
  ~CudaBackend() override;

  Device device() const override { return Device::kCuda; }
  std::unique_ptr<CacheState> new_cache(int64_t batch) const override;
  void forward(CacheState& cache, const float* x, int64_t T, float* y,
               Inspection* inspect) override;
  void fill_random(CacheState& cache, int64_t S, uint64_t seed) override;
  std::vector<double> time_decode(CacheState& cache, const std::vector<const float*>& xs,
                                  int64_t warmup, float* y_scratch, bool attention_only) override;
  double attention_ms() const override { return attention_ms_; }

 private:
  void reserve(CudaCache& cache, int64_t tokens) const;
  // Grows the workspace to `rows` rows with `splits` split partials per (row, group); `scoring`:
  // also the per-row compressed logits and block scores of the step kernels (the tiled prefill
  // keeps its scores in shared memory); `rg_counters`: the per-(row, group)
  // counters of the fused and the short decode kernels.
  void ensure_workspace(int64_t rows, int64_t splits, const CudaCache& cache, bool scoring,
                        bool rg_counters);
  // Whether a prefill of T tokens per sequence onto `length` takes the tiled prefill kernels.
  bool tiled_prefill(int64_t length, int64_t T) const;
  template <typename T>
  PrefillKernels prefill_set(int64_t nb_max) const;
  // Block scores per query the tiled prefill kernel keeps for queries up to position L - 1.
  int64_t prefill_nb_max(int64_t L) const { return L / c_.l_sel + 1; }
  template <typename T>
  void enqueue_prefill_kernels(const StepParams& p, int64_t nb_max);
  // RoPE, append and gates of a tiled prefill launch (prepare_split_).
  template <typename T>
  void enqueue_prefill_prepare(const StepParams& p);
  // Shapes, split plan and cache pointers of one launch over rows [row0, row0 + R) of B * T;
  // the workspace pointers stay null.
  StepParams params(CudaCache& cache, int64_t T, int64_t row0, int64_t R, bool compute_all,
                    int64_t advance) const;
  // The workspace pointers of p (params() leaves them null).
  void bind_workspace(StepParams& p) const;
  // Selection blocks (complete or not) a sequence of `cap` tokens can have.
  int64_t nb_cap(int64_t cap) const { return cap / c_.l_sel + 1; }
  // Whether a decode step runs as the one fused attention kernel (NSA_CUDA_FUSED_DECODE=on).
  bool fused_decode(const CudaCache& cache) const;
  // Blocks per (row, group) of the fused kernel: one selected and one window tile each.
  int64_t fused_splits() const;
  // Why a decode step on this cache cannot run as the short-context kernel, or empty where it
  // can (nsa_short_decode_kernel: a cache of at most 32 selection blocks and 128 compressed
  // tokens whose working set fits one block's shared memory).
  std::string short_decode_refusal(const CudaCache& cache) const;
  // Selection blocks a cache of `cap` tokens holds, complete or not (the short kernel's chunks).
  int64_t short_chunks(int64_t cap) const { return (cap + c_.l_sel - 1) / c_.l_sel; }
  // params() with the workspace grown to what that launch needs and bound.
  StepParams prepared(CudaCache& cache, int64_t T, int64_t row0, int64_t R, bool compute_all,
                      int64_t advance, bool tiled = false);
  // Enqueues one step over rows [row0, row0 + R) whose storage-type inputs are at x_dev.
  // attn_slot >= 0: that launch slot's events around the kernels between the projections
  // (attention_ms()); -1: none.
  // tiled_nb_max > 0: the tiled prefill kernels (rows of one sequence, 16-bit storage) instead
  // of the step kernels, keeping that many block scores per query.
  void enqueue_step(const StepParams& p, const void* x_dev, float* y_dev, bool gemms = true,
                    int attn_slot = -1, int64_t tiled_nb_max = 0);
  template <typename T>
  void enqueue_kernels(const StepParams& p);
  // out [R, N] (f32) = a [R, K] w [N, K]^T in the storage dtype (nsa_gemv_kernel, R small).
  void gemv_launch(const char* name, const void* w, const void* a, float* out, int64_t N, int64_t K,
                   int64_t R, int pdl);
  // Copies n floats at src (device) to dst (host) on copy_stream_ once `ready` has happened
  // (the launch that wrote them is done); adds the host's wait and copy times to wait_ms and
  // copy_ms.
  void copy_out(const float* src, float* dst, int64_t n, cudaEvent_t ready, double& wait_ms,
                double& copy_ms);
  // Launches on the backend's stream; with pdl_ the kernel may start while its predecessor
  // drains (programmatic dependent launch; the kernels wait for their inputs).
  template <typename... Params, typename... Args>
  void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
              Args... args);
  // With probes_ set (NSA_CUDA_KERNEL_TIMES, eager steps only), an event follows each kernel.
  void probe(const char* name);
  void print_phase_clocks(const DeviceBuffer& clocks, int64_t T) const;
  std::vector<std::pair<const char*, cudaEvent_t>>* probes_ = nullptr;

  Config c_;
  DType dtype_;
  size_t esize_;
  int64_t P_;
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;  // device-to-host copies of a launch's output (copy_out)
  int device_ = 0;                      // the CUDA device current when the backend was made
  int sms_ = 1;                         // streaming multiprocessors of the device
  size_t smem_optin_ = 0;  // shared memory a block may opt in to (227 KiB on Hopper, 163 on A100)
  // Dynamic shared memory a kernel with `static_bytes` of static shared memory may ask for:
  // `cap`, or less where the device has less (the cmp kernel of the tiled prefill takes all the
  // device allows: 227 KiB less its static arrays on Hopper).
  size_t dyn_smem_limit(size_t cap, size_t static_bytes = kStaticSmemMargin) const {
    return std::min(cap, smem_optin_ > static_bytes ? smem_optin_ - static_bytes : 0);
  }
  // The projections of steps of at most cuda::kGemvMaxRows rows by nsa_gemv_kernel instead of
  // cuBLAS (NSA_CUDA_GEMV=0: cuBLAS always).
  bool gemv_ = true;
  bool pdl_ = false;  // programmatic dependent launch (sm_90+, NSA_CUDA_PDL=1 turns it on)
  int64_t tiles_per_split_ = 0;  // > 0: fixed split size (NSA_CUDA_TILES_PER_SPLIT, for tests)
  int tc_stages_ = 2;  // key ring depth of the tensor-core kernel (NSA_CUDA_TC_STAGES: 2|3)
  bool sel_group_major_ = true;   // NSA_CUDA_SEL_ORDER=rows: the tiled sel pass row-major
  bool sel_forced_apart_ = true;  // NSA_CUDA_SEL_FORCED=gather: the tiled sel pass gathers all
  bool prefill_rows_ = false;     // NSA_CUDA_PREFILL=rows: prefill through the step kernels
  // NSA_CUDA_PREFILL_PREPARE=fused: the tiled prefill prepares rows with the decode step's
  // nsa_prepare_kernel (4 rows of one group per block); split (default): the streaming RoPE
  // kernel, a cuBLAS GEMM for the gate's first layer and the gate kernel (prefill_prepare.cuh).
  bool prepare_split_ = true;
  bool wgmma_ = false;         // the device runs the sm_90a code (compute capability 9.0)
  int prefill_warps_ = 4;      // NSA_CUDA_PREFILL_WARPS: warps per prefill block (prefill_set)
  size_t smem_per_sm_ = 0;     // shared memory per multiprocessor
  size_t smem_reserved_ = 0;   // of it, what the runtime reserves per block
  int64_t prefill_chunk_ = 0;  // > 0: rows per prefill launch (NSA_CUDA_PREFILL_CHUNK, tests)
  // forward(): the host copies one launch's output while the next one runs
  // (NSA_CUDA_OVERLAP_LAUNCHES=0: one launch at a time, for comparison).
  bool overlap_launches_ = true;
  // Workspace bytes the tiled prefill sizes its launches by (NSA_CUDA_PREFILL_WORKSPACE_MB).
  int64_t prefill_workspace_ = int64_t{1} << 30;
  bool kernel_times_ = false;  // NSA_CUDA_KERNEL_TIMES=1: per-kernel times to stderr
  bool phase_clocks_ = false;  // NSA_CUDA_KERNEL_TIMES=2: also the prefill kernels' phases
  // NSA_CUDA_HOST_TIMES=1: forward()'s host times to stderr without per-kernel events, so with
  // the launches overlapped as by default (wait: the host waiting for a launch's output).
  bool host_times_ = false;
  // NSA_CUDA_FUSED_DECODE=on: decode steps run as the one fused attention kernel where its
  // shared memory fits (experimental: measured no faster than the step kernels,
  // docs/perf-cuda-decode.md); off (default): the step kernels.
  bool fused_ = false;
  // NSA_CUDA_SHORT_DECODE: auto (default) runs decode steps on a short cache as the one
  // short-context kernel; off: the step kernels; on: the short kernel or an error naming why not.
  enum class ShortMode { kAuto, kOn, kOff } short_mode_ = ShortMode::kAuto;
  double attention_ms_ = -1.0;  // device time of the last forward's attention kernels
  // Per launch slot of forward() (decode steps use slot 0): the attention's begin and end
  // events, and the launch's end.
  cudaEvent_t attn_events_[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
  cudaEvent_t launch_done_[2] = {nullptr, nullptr};
  cublasHandle_t blas_ = nullptr;
  DeviceBuffer blas_ws_;
  DeviceBuffer w_in_, w_out_, fc1_w_, fc1_b_, fc2_w_, fc2_b_;
  DeviceBuffer rope_freq_;  // [dk / 2] doubles, as core::rope_inplace computes them
  // Per-step workspace (grown outside graph capture only, see ensure_workspace).
  PinnedBuffer x_host_;  // two launches' input rows in the storage type, on their way to x_
  PinnedBuffer y_host_;  // two chunks of output rows on their way from y_ to the caller
  cudaEvent_t out_ready_[2] = {nullptr, nullptr};  // a chunk of y_host_ has arrived
  DeviceBuffer x_, proj_, q_, gates_, logits_, block_scores_, part_m_, part_s_, part_o_,
      sel_blocks_, sel_count_, reads_, done_, rg_done_, o_cmp_, o_sel_, o_win_, o_, y_;
  DeviceBuffer y_alt_;   // forward(): the output of every second launch (copied out meanwhile)
  DeviceBuffer gate_u_;  // tiled prefill, split prepare: u [R G, dk] then hid [R G, g_hid]
};

CudaBackend::CudaBackend(const Config& c, const LayerWeights& w, const LayerOptions& o)
    : c_(c), dtype_(o.dtype), esize_(dtype_size(o.dtype)) {
  cuda_type(dtype_);
  NSA_CHECK(c.n_sel <= 64,
            "config key 'n_sel': value {} is not supported by the CUDA backend; allowed: <= 64",
            c.n_sel);
  NSA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  int major = 0;
  NSA_CUDA_CHECK(cudaGetDevice(&device_));
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_));
  int minor = 0;
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_));
  wgmma_ = major == 9 && minor == 0;
  if (const char* warps = std::getenv("NSA_CUDA_PREFILL_WARPS"); warps != nullptr) {
    const std::string_view w(warps);
    NSA_CHECK(w == "4" || w == "8" || w == "12",
              "NSA_CUDA_PREFILL_WARPS: value '{}' is not valid; allowed: 4 (the default), 8, 12",
              warps);
    prefill_warps_ = std::atoi(warps);
  }
  int optin = 0;
  NSA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
  smem_optin_ = static_cast<size_t>(optin);
  int per_sm = 0;
  NSA_CUDA_CHECK(
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device_));
  smem_per_sm_ = static_cast<size_t>(per_sm);
  int reserved = 0;
  NSA_CUDA_CHECK(
      cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device_));
  smem_reserved_ = static_cast<size_t>(reserved);
  // Off by default: measured no gain (docs/perf-cuda-decode.md); NSA_CUDA_PDL=1 turns it on.
  const char* pdl_env = std::getenv("NSA_CUDA_PDL");
  pdl_ = major >= 9 && pdl_env != nullptr && std::string_view(pdl_env) == "1";
  if (const char* stages = std::getenv("NSA_CUDA_TC_STAGES"); stages != nullptr) {
    tc_stages_ = std::atoi(stages);
    NSA_CHECK(tc_stages_ == 2 || tc_stages_ == 3,
              "NSA_CUDA_TC_STAGES: value '{}' is not valid; allowed: 2, 3", stages);
  }
  if (const char* tiles = std::getenv("NSA_CUDA_TILES_PER_SPLIT"); tiles != nullptr) {
    tiles_per_split_ = std::atoll(tiles);
    NSA_CHECK(tiles_per_split_ >= 1,
              "NSA_CUDA_TILES_PER_SPLIT: value '{}' is not valid; allowed: "
              "an integer >= 1",
              tiles);
  }
  if (const char* mode = std::getenv("NSA_CUDA_PREFILL"); mode != nullptr) {
    NSA_CHECK(std::string_view(mode) == "rows" || std::string_view(mode) == "tiled",
              "NSA_CUDA_PREFILL: value '{}' is not valid; allowed: rows, tiled", mode);
    prefill_rows_ = std::string_view(mode) == "rows";
  }
  if (const char* prep = std::getenv("NSA_CUDA_PREFILL_PREPARE"); prep != nullptr) {
    const std::string_view v(prep);
    NSA_CHECK(v == "split" || v == "fused",
              "NSA_CUDA_PREFILL_PREPARE: value '{}' is not valid; allowed: split, fused", prep);
    prepare_split_ = v == "split";
  }
  if (const char* order = std::getenv("NSA_CUDA_SEL_ORDER"); order != nullptr) {
    NSA_CHECK(std::string_view(order) == "rows" || std::string_view(order) == "groups",
              "NSA_CUDA_SEL_ORDER: value '{}' is not valid; allowed: rows, groups", order);
    sel_group_major_ = std::string_view(order) == "groups";
  }
  if (const char* forced = std::getenv("NSA_CUDA_SEL_FORCED"); forced != nullptr) {
    const std::string_view v(forced);
    NSA_CHECK(v == "apart" || v == "gather",
              "NSA_CUDA_SEL_FORCED: value '{}' is not valid; allowed: apart, gather", forced);
    sel_forced_apart_ = v == "apart";
  }
  if (const char* chunk = std::getenv("NSA_CUDA_PREFILL_CHUNK"); chunk != nullptr) {
    prefill_chunk_ = positive_knob("NSA_CUDA_PREFILL_CHUNK", chunk);
  }
  if (const char* ov = std::getenv("NSA_CUDA_OVERLAP_LAUNCHES"); ov != nullptr) {
    overlap_launches_ = flag_knob("NSA_CUDA_OVERLAP_LAUNCHES", ov);
  }
  if (const char* mb = std::getenv("NSA_CUDA_PREFILL_WORKSPACE_MB"); mb != nullptr) {
    const int64_t v = positive_knob("NSA_CUDA_PREFILL_WORKSPACE_MB", mb);
    NSA_CHECK(v <= (int64_t{1} << 20),
              "NSA_CUDA_PREFILL_WORKSPACE_MB: value '{}' is not valid; allowed: 1 to 1048576", mb);
    prefill_workspace_ = v << 20;
  }
  if (const char* mode = std::getenv("NSA_CUDA_FUSED_DECODE"); mode != nullptr) {
    const std::string_view m(mode);
    NSA_CHECK(m == "on" || m == "off",
              "NSA_CUDA_FUSED_DECODE: value '{}' is not valid; allowed: on, off", mode);
    fused_ = m == "on";
  }
  if (const char* gv = std::getenv("NSA_CUDA_GEMV"); gv != nullptr) {
    gemv_ = flag_knob("NSA_CUDA_GEMV", gv);
  }
  if (const char* mode = std::getenv("NSA_CUDA_SHORT_DECODE"); mode != nullptr) {
    const std::string_view m(mode);
    NSA_CHECK(m == "auto" || m == "on" || m == "off",
              "NSA_CUDA_SHORT_DECODE: value '{}' is not valid; allowed: auto, on, off", mode);
    short_mode_ = m == "auto" ? ShortMode::kAuto : m == "on" ? ShortMode::kOn : ShortMode::kOff;
  }
  if (const char* ht = std::getenv("NSA_CUDA_HOST_TIMES"); ht != nullptr) {
    host_times_ = flag_knob("NSA_CUDA_HOST_TIMES", ht);
  }
  if (const char* kt_env = std::getenv("NSA_CUDA_KERNEL_TIMES"); kt_env != nullptr) {
    const std::string_view kt(kt_env);
    NSA_CHECK(kt == "0" || kt == "1" || kt == "2",
              "NSA_CUDA_KERNEL_TIMES: value '{}' is not valid; allowed: 0, 1, 2 (1 and the "
              "prefill kernels' phase clocks)",
              kt_env);
    kernel_times_ = kt != "0";
    phase_clocks_ = kt == "2";
  }
  for (auto& slot : attn_events_) {
    for (auto& e : slot) NSA_CUDA_CHECK(cudaEventCreate(&e));
  }
  for (auto& e : out_ready_) NSA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  for (auto& e : launch_done_) {
    NSA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  NSA_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
  NSA_CUBLAS_CHECK(cublasCreate(&blas_));
  NSA_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
  // CUBLAS_COMPUTE_32F never uses TF32 under the default math mode, so fp32 stays fp32.
  NSA_CUBLAS_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
  blas_ws_ =
      DeviceBuffer(32u << 20);  // a fixed cuBLAS workspace keeps graph capture allocation-free
  NSA_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_ws_.get(), blas_ws_.bytes()));

  std::vector<float> w_in;
  for (const Tensor* t :
       {&w.w_q, &w.w_k_cmp, &w.w_v_cmp, &w.w_k_sel, &w.w_v_sel, &w.w_k_win, &w.w_v_win}) {
    w_in.insert(w_in.end(), t->data<float>(), t->data<float>() + t->numel());
  }
  P_ = static_cast<int64_t>(w_in.size()) / c.dim;
  auto upload = [&](const float* src, int64_t n, DType t) {
    const auto bytes = to_storage(src, n, t);
    DeviceBuffer b(bytes.size());
    NSA_CUDA_CHECK(cudaMemcpy(b.get(), bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
    return b;
  };
  w_in_ = upload(w_in.data(), static_cast<int64_t>(w_in.size()), dtype_);
  w_out_ = upload(w.w_out.data<float>(), w.w_out.numel(), dtype_);
  fc1_w_ = upload(w.fc1_w.data<float>(), w.fc1_w.numel(), DType::kF32);
  fc1_b_ = upload(w.fc1_b.data<float>(), w.fc1_b.numel(), DType::kF32);
  fc2_w_ = upload(w.fc2_w.data<float>(), w.fc2_w.numel(), DType::kF32);
  fc2_b_ = upload(w.fc2_b.data<float>(), w.fc2_b.numel(), DType::kF32);
  {
    std::vector<double> freq(static_cast<size_t>(c.dk / 2));
    for (size_t i = 0; i < freq.size(); ++i)
      freq[i] = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(c.dk));
    rope_freq_ = DeviceBuffer(freq.size() * sizeof(double));
    NSA_CUDA_CHECK(
        cudaMemcpy(rope_freq_.get(), freq.data(), rope_freq_.bytes(), cudaMemcpyHostToDevice));
  }
}

CudaBackend::~CudaBackend() {
  for (auto& slot : attn_events_) {
    for (auto& e : slot) {
      if (e) cudaEventDestroy(e);
    }
  }
  for (auto& e : out_ready_) {
    if (e) cudaEventDestroy(e);
  }
  for (auto& e : launch_done_) {
    if (e) cudaEventDestroy(e);
  }
  if (blas_) cublasDestroy(blas_);
  if (copy_stream_) cudaStreamDestroy(copy_stream_);
  if (stream_) cudaStreamDestroy(stream_);
}

std::unique_ptr<CacheState> CudaBackend::new_cache(int64_t batch) const {
  auto cache = std::make_unique<CudaCache>();
  cache->batch = batch;
  cache->len = DeviceBuffer(sizeof(int64_t));
  NSA_CUDA_CHECK(cudaMemsetAsync(cache->len.get(), 0, sizeof(int64_t), stream_));
  reserve(*cache, 1024);
  return cache;
}

// Grows the cache to hold `tokens` positions per sequence, keeping its contents.
void CudaBackend::reserve(CudaCache& cache, int64_t tokens) const {
  if (tokens <= cache.cap) return;
  // The kernels index positions within a sequence with 32-bit arithmetic (cuda::div32).
  NSA_CHECK(tokens < (int64_t{1} << 31),
            "context of {} tokens per sequence exceeds the CUDA backend's limit of 2^31 - 1",
            tokens);
  auto sel_smem = [&](int64_t cap) { return cuda::select_smem_bytes(nb_cap(cap)); };
  // The selection kernel keeps the block scores of a sequence in shared memory.
  const size_t max_sel = dyn_smem_limit(kMaxSelectSmem);
  NSA_CHECK(sel_smem(tokens) <= max_sel,
            "context of {} tokens per sequence exceeds the CUDA backend's limit (the selection "
            "kernel needs {} KiB of shared memory for it, at most {} KiB are available)",
            tokens, sel_smem(tokens) >> 10, max_sel >> 10);
  int64_t cap = std::max({tokens, 2 * cache.cap, int64_t{1024}});
  if (sel_smem(cap) > max_sel) cap = tokens;  // no headroom near the limit
  const int64_t cap_cmp = std::max<int64_t>(1, core::num_cmp(cap, c_.l, c_.d));
  const int64_t BG = cache.batch * c_.groups;
  auto grow = [&](DeviceBuffer& buf, int64_t old_cap, int64_t new_cap, int64_t width) {
    DeviceBuffer nb(static_cast<size_t>(BG * new_cap * width) * esize_);
    if (buf.get() && old_cap > 0) {
      const size_t old_pitch = static_cast<size_t>(old_cap * width) * esize_;
      NSA_CUDA_CHECK(cudaMemcpy2DAsync(nb.get(), static_cast<size_t>(new_cap * width) * esize_,
                                       buf.get(), old_pitch, old_pitch, static_cast<size_t>(BG),
                                       cudaMemcpyDeviceToDevice, stream_));
      NSA_CUDA_CHECK(cudaStreamSynchronize(stream_));  // before the old buffer is freed
    }
    buf = std::move(nb);
  };
  for (auto [buf, width] : cache.raw_arrays(c_.dk, c_.dv)) {
    grow(*buf, cache.cap, cap, width);
  }
  grow(cache.k_cmp, cache.cap_cmp, cap_cmp, c_.dk);
  grow(cache.v_cmp, cache.cap_cmp, cap_cmp, c_.dv);
  cache.cap = cap;
  cache.cap_cmp = cap_cmp;
}

void CudaBackend::ensure_workspace(int64_t rows, int64_t splits, const CudaCache& cache,
                                   bool scoring, bool rg_counters) {
  // Each buffer grows on its own (contents are not kept: they live within one step).
  auto grow = [](DeviceBuffer& buf, int64_t n, size_t elem) {
    const size_t bytes = static_cast<size_t>(n) * elem;
    if (buf.bytes() < bytes) buf = DeviceBuffer(bytes);
  };
  const int64_t H = c_.heads, G = c_.groups, dv = c_.dv, h = c_.heads_per_group();
  const int64_t slots = rows * splits;
  grow(x_, rows * c_.dim, esize_);
  grow(proj_, rows * P_, 4);
  grow(q_, rows * H * c_.dk, esize_);
  grow(gates_, rows * G * 3, 4);
  if (scoring) {
    grow(logits_, rows * H * cache.cap_cmp, 4);
    grow(block_scores_, rows * G * nb_cap(cache.cap), 4);
  } else if (prepare_split_) {
    grow(gate_u_, rows * G * (c_.dk + c_.gate_hidden), 4);
  }
  grow(part_m_, slots * G * h, 4);
  grow(part_s_, slots * G * h, 4);
  grow(part_o_, slots * G * h * dv, 4);
  grow(sel_blocks_, rows * G * c_.n_sel, sizeof(int32_t));
  grow(sel_count_, rows * G, sizeof(int32_t));
  grow(reads_, rows * G * 3, sizeof(int32_t));
  if (!done_.get()) {
    done_ = DeviceBuffer(sizeof(uint32_t));
    NSA_CUDA_CHECK(cudaMemset(done_.get(), 0, done_.bytes()));
  }
  // The fused and short decode kernels' per-(row, group) counters, zeroed; only they use them.
  if (rg_counters && rg_done_.bytes() < static_cast<size_t>(rows * G) * sizeof(uint32_t)) {
    rg_done_ = DeviceBuffer(static_cast<size_t>(rows * G) * sizeof(uint32_t));
    NSA_CUDA_CHECK(cudaMemset(rg_done_.get(), 0, rg_done_.bytes()));
  }
  grow(o_cmp_, rows * H * dv, 4);
  grow(o_sel_, rows * H * dv, 4);
  grow(o_win_, rows * H * dv, 4);
  grow(o_, rows * H * dv, esize_);
  grow(y_, rows * c_.dim, 4);
  grow(y_alt_, rows * c_.dim, 4);
}

StepParams CudaBackend::params(CudaCache& cache, int64_t T, int64_t row0, int64_t R,
                               bool compute_all, int64_t advance) const {
  StepParams p{};
  p.B = cache.batch;
  p.T = T;
  p.row0 = row0;
  p.R = R;
  p.H = c_.heads;
  p.G = c_.groups;
  p.h = c_.heads_per_group();
  p.dk = c_.dk;
  p.dv = c_.dv;
  p.dim = c_.dim;
  p.P = P_;
  p.l = c_.l;
  p.d = c_.d;
  p.l_sel = c_.l_sel;
  p.n_sel = c_.n_sel;
  p.w = c_.w;
  p.g_hid = c_.gate_hidden;
  p.cap = cache.cap;
  p.cap_cmp = cache.cap_cmp;
  // Split plan: the cmp keys in phase 0, the selected and the window keys in phase 1 (the
  // window does not wait for the selection, but there it keeps phase 0's blocks all equally
  // long). Whole 64-key tiles per split; tiles per split are chosen to minimise
  // waves x (tiles + kFixedTiles), waves of 2 blocks per SM: longer splits amortise a block's
  // fixed latency (parameters, first tile, merge), more splits fill the GPU, and a last wave
  // that is nearly empty costs as much as a full one. Planned for the length after this call;
  // the device sizes the splits from the actual length, so a graph replayed over later steps
  // stays correct.
  const int64_t L = cache.length + T, tile = cuda::kTileKeys;
  const int64_t cmp_tiles = (core::num_cmp(L, c_.l, c_.d) + tile - 1) / tile;
  const int64_t win_tiles = (std::min(c_.w, L) + tile - 1) / tile;
  const int64_t sel_tiles = (c_.n_sel * c_.l_sel + tile - 1) / tile;
  const int64_t RG = std::max<int64_t>(1, R * c_.groups), slots = int64_t{2} * sms_;
  constexpr int64_t kFixedTiles = 3;
  auto n_splits = [](int64_t tiles, int64_t per) {
    return std::clamp<int64_t>((tiles + per - 1) / per, 1, cuda::kMaxSplits);
  };
  auto best_per = [&](int64_t a, int64_t b) {
    int64_t best = 1, best_cost = INT64_MAX;
    for (int64_t per = 1; per <= std::max<int64_t>({a, b, 1}); ++per) {
      const int64_t blocks = RG * (n_splits(a, per) + (b > 0 ? n_splits(b, per) : 0));
      const int64_t cost = (blocks + slots - 1) / slots * (per + kFixedTiles);
      if (cost < best_cost) {
        best = per;
        best_cost = cost;
      }
    }
    return best;
  };
  int64_t per0 = best_per(cmp_tiles, 0), per1 = best_per(sel_tiles, win_tiles);
  if (tiles_per_split_ > 0) per0 = per1 = tiles_per_split_;
  p.n_cmp_splits = n_splits(cmp_tiles, per0);
  p.n_win_splits = n_splits(win_tiles, per1);
  p.n_sel_splits = n_splits(sel_tiles, per1);
  p.gate_sigmoid = c_.gate == GateKind::kSigmoid;
  p.gate_temp = static_cast<float>(c_.gate_temp);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c_.dk)));
  p.rope_freq = rope_freq_.as<double>();
  p.compute_all = compute_all;
  p.pdl = pdl_ ? 1 : 0;
  p.len = cache.len.as<int64_t>();
  p.len_out = advance > 0 ? cache.len.as<int64_t>() : nullptr;
  p.advance = advance;
  p.fc1_w = fc1_w_.as<float>();
  p.fc1_b = fc1_b_.as<float>();
  p.fc2_w = fc2_w_.as<float>();
  p.fc2_b = fc2_b_.as<float>();
  p.k_cmp_raw = cache.k_cmp_raw.get();
  p.v_cmp_raw = cache.v_cmp_raw.get();
  p.k_sel = cache.k_sel.get();
  p.v_sel = cache.v_sel.get();
  p.k_win = cache.k_win.get();
  p.v_win = cache.v_win.get();
  p.k_cmp = cache.k_cmp.get();
  p.v_cmp = cache.v_cmp.get();
  p.nb_cap = nb_cap(cache.cap);
  return p;
}

void CudaBackend::bind_workspace(StepParams& p) const {
  p.proj = proj_.as<float>();
  p.q = q_.get();
  p.gates = gates_.as<float>();
  p.cmp_logits = logits_.as<float>();
  p.block_scores = block_scores_.as<float>();
  p.part_m = part_m_.as<float>();
  p.part_s = part_s_.as<float>();
  p.part_o = part_o_.as<float>();
  p.sel_blocks = sel_blocks_.as<int32_t>();
  p.sel_count = sel_count_.as<int32_t>();
  p.reads = reads_.as<int32_t>();
  p.done = done_.as<uint32_t>();
  p.rg_done = rg_done_.as<uint32_t>();
  p.o_cmp = o_cmp_.as<float>();
  p.o_sel = o_sel_.as<float>();
  p.o_win = o_win_.as<float>();
  p.o = o_.get();
}

StepParams CudaBackend::prepared(CudaCache& cache, int64_t T, int64_t row0, int64_t R,
                                 bool compute_all, int64_t advance, bool tiled) {
  StepParams p = params(cache, T, row0, R, compute_all, advance);
  if (tiled) {
    // One partial per row for the compressed and the window branch; the sel pass writes the
    // output (one split per row), and forward() advances the length after the last launch.
    p.n_cmp_splits = 1;
    p.n_win_splits = 1;
    p.n_sel_splits = 1;
    p.sel_fused = 1;
    p.sel_group_major = sel_group_major_ ? 1 : 0;
    p.sel_forced_apart = sel_forced_apart_ ? 1 : 0;
    p.len_out = nullptr;
    p.advance = 0;
  } else if (T == 1 && fused_decode(cache)) {
    // One block per (row, group) and split; block y takes the selected and the window split y.
    p.fused_decode = 1;
    p.n_cmp_splits = 1;
    p.n_sel_splits = p.n_win_splits = fused_splits();
  } else if (T == 1 && short_mode_ != ShortMode::kOff) {
    const std::string why = short_decode_refusal(cache);
    NSA_CHECK(why.empty() || short_mode_ == ShortMode::kAuto,
              "NSA_CUDA_SHORT_DECODE=on: this decode step cannot run as the short-context kernel: "
              "{}",
              why);
    if (why.empty()) {
      // One block per selection block of the cache and one for the compressed branch.
      p.short_decode = 1;
      p.n_cmp_splits = 1;
      p.n_sel_splits = p.n_win_splits = short_chunks(cache.cap);
    }
  }
  ensure_workspace(R, cuda::n_splits_total(p), cache, !tiled,
                   p.fused_decode != 0 || p.short_decode != 0);
  bind_workspace(p);
  return p;
}

// Through the pinned staging buffer in chunks: the host copies chunk i on (threaded, which also
// takes a fresh output tensor's first-touch page faults on several cores) while chunk i + 1 is in
// flight. One pageable cudaMemcpy into a fresh 671 MB tensor was the largest host cost of a 64k
// prefill (docs/perf-cuda-prefill.md).
void CudaBackend::copy_out(const float* src, float* dst, int64_t n, cudaEvent_t ready,
                           double& wait_ms, double& copy_ms) {
  constexpr int64_t kChunk = int64_t{8} << 20;  // floats (32 MiB)
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto* stage = static_cast<float*>(
      y_host_.reserve(static_cast<size_t>(std::min(n, 2 * kChunk)) * sizeof(float)));
  auto chunk_size = [&](int64_t i) { return std::min(kChunk, n - i * kChunk); };
  NSA_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, ready, 0));
  for (int64_t i = 0; i <= chunks; ++i) {
    if (i < chunks) {
      NSA_CUDA_CHECK(cudaMemcpyAsync(stage + (i % 2) * kChunk, src + i * kChunk,
                                     static_cast<size_t>(chunk_size(i)) * sizeof(float),
                                     cudaMemcpyDeviceToHost, copy_stream_));
      NSA_CUDA_CHECK(cudaEventRecord(out_ready_[i % 2], copy_stream_));
    }
    if (i > 0) {
      const int64_t j = i - 1;
      auto t0 = Clock::now();
      NSA_CUDA_CHECK(cudaEventSynchronize(out_ready_[j % 2]));
      wait_ms += ms_since(t0);
      t0 = Clock::now();
      convert_from_f32(stage + (j % 2) * kChunk, chunk_size(j), DType::kF32, dst + j * kChunk);
      copy_ms += ms_since(t0);
    }
  }
}

int64_t CudaBackend::fused_splits() const {
  const int64_t tile = cuda::kTileKeys;
  return std::clamp<int64_t>(
      std::max((c_.n_sel * c_.l_sel + tile - 1) / tile, (c_.w + tile - 1) / tile), 1,
      cuda::kMaxSplits);
}

bool CudaBackend::fused_decode(const CudaCache& cache) const {
  return fused_ && cuda::fused_smem_bytes(c_.heads_per_group(), c_.dk, c_.dv, c_.gate_hidden, c_.l,
                                          c_.d, c_.l_sel, nb_cap(cache.cap),
                                          fused_splits()) <= dyn_smem_limit(kMaxFusedSmem);
}

std::string CudaBackend::short_decode_refusal(const CudaCache& cache) const {
  const int64_t chunks = short_chunks(cache.cap);
  if (chunks > cuda::kShortMaxChunks) {
    return fmt::format("the cache holds {} selection blocks (capacity {} tokens), more than {}",
                       chunks, cache.cap, cuda::kShortMaxChunks);
  }
  if (cache.cap_cmp > cuda::kShortMaxCmp) {
    return fmt::format("the cache holds {} compressed tokens, more than {}", cache.cap_cmp,
                       cuda::kShortMaxCmp);
  }
  if (c_.l_sel > cuda::kShortMaxTile) {
    return fmt::format("l_sel {} is above {}", c_.l_sel, cuda::kShortMaxTile);
  }
  const auto es = static_cast<int64_t>(esize_);
  if ((c_.dk * es) % 16 != 0 || (c_.dv * es) % 16 != 0) {
    return fmt::format("dk {} and dv {} must be multiples of {} elements", c_.dk, c_.dv, 16 / es);
  }
  const auto bytes =
      static_cast<size_t>(cuda::short_layout(c_.heads_per_group(), c_.dk, c_.dv, c_.gate_hidden,
                                             c_.l, c_.l_sel, cache.cap_cmp, es)
                              .bytes);
  if (bytes > dyn_smem_limit(kMaxShortSmem)) {
    return fmt::format("it needs {} KiB of shared memory per block, at most {} KiB are available",
                       bytes >> 10, dyn_smem_limit(kMaxShortSmem) >> 10);
  }
  return {};
}

void CudaBackend::probe(const char* name) {
  if (probes_ == nullptr) return;
  cudaEvent_t e = nullptr;
  NSA_CUDA_CHECK(cudaEventCreate(&e));
  NSA_CUDA_CHECK(cudaEventRecord(e, stream_));
  probes_->emplace_back(name, e);
}

template <typename... Params, typename... Args>
void CudaBackend::launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                         size_t smem, Args... args) {
  // Static plus dynamic shared memory above 48 KiB needs the opt-in: raise it when a launch
  // needs more than any launch of this kernel before, not on every launch. The attribute
  // belongs to the kernel on the device, shared by every backend, so it is tracked process-wide
  // and only ever raised (one backend must not lower it under another).
  {
    static std::mutex mutex;
    static std::map<std::pair<int, const void*>, size_t> allowed;
    const std::lock_guard<std::mutex> lock(mutex);
    size_t& now = allowed[{device_, reinterpret_cast<const void*>(kernel)}];
    if (smem > now) {
      NSA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
      now = smem;
    }
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream_;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl_ ? 1 : 0;
  NSA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
  probe(name);
}

using AttnKernel = void (*)(StepParams, int);

template <typename T, int DK, int DV>
bool pick_tc(int64_t dk, int64_t dv, int stages, AttnKernel& kernel, size_t& smem) {
  if (dk != DK || dv != DV) return false;
  if (stages == 2) {
    kernel = cuda::nsa_attn_tc_kernel<T, DK, DV, 2, 2>;
    smem = cuda::TcShape<DK, DV, 2, 2>::kSmemBytes;
  } else {
    kernel = cuda::nsa_attn_tc_kernel<T, DK, DV, 3, 2>;
    smem = cuda::TcShape<DK, DV, 3, 2>::kSmemBytes;
  }
  return true;
}

// The tensor-core attention kernel for these head dims, or null (FFMA kernel instead).
template <typename T>
AttnKernel tc_kernel(int64_t dk, int64_t dv, int stages, size_t& smem) {
  AttnKernel k = nullptr;
  (void)(pick_tc<T, 32, 32>(dk, dv, stages, k, smem) ||
         pick_tc<T, 64, 64>(dk, dv, stages, k, smem) ||
         pick_tc<T, 128, 128>(dk, dv, stages, k, smem) ||
         pick_tc<T, 192, 128>(dk, dv, stages, k, smem));
  return k;
}

template <typename T>
void CudaBackend::enqueue_kernels(const StepParams& p) {
  const auto R = static_cast<unsigned>(p.R), RG = static_cast<unsigned>(p.R * p.G);
  const auto G = static_cast<unsigned>(p.G);
  if (p.fused_decode) {
    launch("fused_decode", cuda::nsa_fused_decode_kernel<T>,
           dim3(RG, static_cast<unsigned>(p.n_sel_splits)), dim3(cuda::kFusedThreads),
           cuda::fused_smem_bytes(p.h, p.dk, p.dv, p.g_hid, p.l, p.d, p.l_sel, p.nb_cap,
                                  p.n_sel_splits),
           p);
    return;
  }
  if (p.short_decode) {
    const auto bytes = static_cast<size_t>(
        cuda::short_layout(p.h, p.dk, p.dv, p.g_hid, p.l, p.l_sel, p.cap_cmp, sizeof(T)).bytes);
    launch("short_decode", cuda::nsa_short_decode_kernel<T>,
           dim3(RG, static_cast<unsigned>(p.n_sel_splits + 1)), dim3(cuda::kShortThreads), bytes,
           p);
    return;
  }
  // A decode step (one token per sequence) emits inside the prepare kernel; prefill rows of one
  // sequence are spread over blocks, so their emission runs after every row is appended.
  const int emit_inside = p.T == 1 ? 1 : 0;
  launch("prepare", cuda::nsa_prepare_kernel<T>, dim3(R, G), dim3(cuda::kPrepareThreads),
         cuda::prepare_smem_bytes(p.h, p.dk, p.g_hid), p, emit_inside, 1);
  if (!emit_inside) launch("emit", cuda::nsa_emit_kernel<T>, dim3(R, G), dim3(128), 0, p);
  // Tensor cores for 16-bit storage when the group fits the MMA rows; fp32 FFMA otherwise.
  size_t attn_smem = cuda::ffma_smem_bytes(p.h, p.dk, p.dv);
  AttnKernel attn = cuda::nsa_attn_split_kernel<T>;
  if constexpr (!std::is_same_v<T, float>) {
    size_t tc_smem = 0;
    if (AttnKernel tc = tc_kernel<T>(p.dk, p.dv, tc_stages_, tc_smem); tc != nullptr && p.h <= 16) {
      attn = tc;
      attn_smem = tc_smem;
    }
  }
  launch("attn_cmp", attn, dim3(RG, static_cast<unsigned>(p.n_cmp_splits)), dim3(128), attn_smem, p,
         0);
  const auto score_chunks =
      static_cast<unsigned>((p.nb_cap + cuda::kScoreBlocks - 1) / cuda::kScoreBlocks);
  launch("score", cuda::nsa_score_kernel, dim3(RG, score_chunks), dim3(cuda::kScoreThreads),
         cuda::score_smem_bytes(p.h, p.l, p.d, p.l_sel), p);
  launch("select", cuda::nsa_select_kernel, dim3(RG), dim3(cuda::kSelectThreads),
         cuda::select_smem_bytes(p.nb_cap), p);
  launch("attn_sel_win", attn, dim3(RG, static_cast<unsigned>(p.n_sel_splits + p.n_win_splits)),
         dim3(128), attn_smem, p, 1);
  const auto combine_threads =
      static_cast<unsigned>(std::clamp<int64_t>((p.dv + 31) / 32 * 32, 96, 256));
  launch("combine", cuda::nsa_combine_kernel<T>, dim3(R, static_cast<unsigned>(p.H)),
         dim3(combine_threads), 0, p);
}

using PfCmpKernel = void (*)(StepParams, int64_t);
using PfWinKernel = void (*)(StepParams);

struct PrefillKernels {
  PfCmpKernel cmp = nullptr;
  PfWinKernel win = nullptr;
  PfWinKernel fsel = nullptr;  // the forced blocks of the selected branch (p.sel_forced_apart)
  // The same with phase clocks (NSA_CUDA_KERNEL_TIMES=2), where instantiated: the paper's head
  // dims (192 / 128) in the default 4-warp blocks of the wgmma path; else null.
  PfCmpKernel cmp_clock = nullptr;
  PfWinKernel win_clock = nullptr;
  AttnKernel sel = nullptr;         // the decode kernel's gathered attention, one split per block
  AttnKernel sel_forced = nullptr;  // the same, merging the forced blocks' partial (prefill_fsel)
  size_t pipe_smem = 0, sel_smem = 0;
  size_t cmp_static_smem = 0;  // the cmp kernel's static shared memory
  int threads = 0, rows = 0;   // per block of the cmp and window kernels
};

// wgmma: the device runs the sm_90a code (the shared-memory layout depends on it).
template <typename T, int DK, int DV, int W>
bool pick_prefill(int64_t dk, int64_t dv, int stages, bool wgmma, PrefillKernels& k) {
  if (dk != DK || dv != DV) return false;
  k.cmp = cuda::nsa_prefill_cmp_kernel<T, DK, DV, W>;
  k.win = cuda::nsa_prefill_win_kernel<T, DK, DV, W>;
  k.fsel = cuda::nsa_prefill_fsel_kernel<T, DK, DV, W>;
  if constexpr (DK == 192 && DV == 128 && W == 4) {
    k.cmp_clock = cuda::nsa_prefill_cmp_kernel<T, DK, DV, W, true>;
    k.win_clock = cuda::nsa_prefill_win_kernel<T, DK, DV, W, true>;
  }
  if (stages == 3) {
    k.sel = cuda::nsa_attn_tc_kernel<T, DK, DV, 3, 2>;
    k.sel_forced = cuda::nsa_attn_tc_kernel<T, DK, DV, 3, 2, true>;
    k.sel_smem = cuda::TcShape<DK, DV, 3, 2>::kFusedSmemBytes;
  } else {
    k.sel = cuda::nsa_attn_tc_kernel<T, DK, DV, 2, 2>;
    k.sel_forced = cuda::nsa_attn_tc_kernel<T, DK, DV, 2, 2, true>;
    k.sel_smem = cuda::TcShape<DK, DV, 2, 2>::kFusedSmemBytes;
  }
  k.pipe_smem = cuda::pf_pipe_bytes<DK, DV, W>(wgmma);
  k.cmp_static_smem = cuda::PfWarps<W>::kCmpStaticSmem;
  k.threads = cuda::PfWarps<W>::kThreads;
  k.rows = cuda::PfWarps<W>::kRows;
  return true;
}

// The tiled prefill kernels for these head dims (the tensor-core kernel's set), or none. Blocks
// of 8 warps (128 rows) on the mma.sync path (measured faster than 4 warps there). warps = 4 or
// 12 where the wgmma path runs (wgmma and its head dims), else 8: 4 is one warpgroup of 64 rows,
// two blocks per SM (measured faster than 8 on the wgmma path, docs/perf-cuda-prefill.md), 12
// three warpgroups with Q in shared memory (measured no faster than 8).
// `stages`: the key ring of the selected pass (2 or 3).
template <typename T, int W>
bool pick_prefill_wgmma(int64_t dk, int64_t dv, int stages, PrefillKernels& k) {
  return pick_prefill<T, 128, 128, W>(dk, dv, stages, true, k) ||
         pick_prefill<T, 192, 128, W>(dk, dv, stages, true, k);
}

template <typename T>
PrefillKernels prefill_kernels(int64_t dk, int64_t dv, int stages, bool wgmma, int warps) {
  PrefillKernels k;
  if (wgmma && warps == 12 && pick_prefill_wgmma<T, 12>(dk, dv, stages, k)) return k;
  if (wgmma && warps == 4 && pick_prefill_wgmma<T, 4>(dk, dv, stages, k)) return k;
  constexpr int W = 8;
  (void)(pick_prefill<T, 32, 32, W>(dk, dv, stages, wgmma, k) ||
         pick_prefill<T, 64, 64, W>(dk, dv, stages, wgmma, k) ||
         pick_prefill<T, 128, 128, W>(dk, dv, stages, wgmma, k) ||
         pick_prefill<T, 192, 128, W>(dk, dv, stages, wgmma, k));
  return k;
}

// Whether the kernels' shared memory holds the scores of nb_max selection blocks per query.
bool prefill_fits(const PrefillKernels& k, int64_t h, int64_t nb_max, size_t limit) {
  return k.cmp != nullptr &&
         k.pipe_smem + cuda::prefill_score_smem(k.rows, h, nb_max) + k.cmp_static_smem <= limit;
}

// The tiled prefill kernels for a call whose queries see up to nb_max selection blocks. Where
// the wgmma path runs: 4-warp blocks by default (measured faster than 8 at the paper's shapes,
// docs/perf-cuda-prefill.md) while two of them fit an SM with the scores (up to ~100k tokens at
// h = 16, dk 192), 12-warp blocks where asked for (NSA_CUDA_PREFILL_WARPS=12) while one holds
// the scores (~88k); else, and for longer contexts, the 8-warp ones (~280k).
template <typename T>
PrefillKernels CudaBackend::prefill_set(int64_t nb_max) const {
  const int64_t h = c_.heads_per_group();
  size_t limit = dyn_smem_limit(SIZE_MAX, 0);  // the device's opt-in limit
  // Two 4-warp blocks per SM, each with the shared memory the runtime reserves per block.
  if (prefill_warps_ == 4) limit = std::min(limit, smem_per_sm_ / 2 - smem_reserved_);
  PrefillKernels k = prefill_kernels<T>(c_.dk, c_.dv, tc_stages_, wgmma_, prefill_warps_);
  if (prefill_warps_ != 8 && !prefill_fits(k, h, nb_max, limit)) {
    k = prefill_kernels<T>(c_.dk, c_.dv, tc_stages_, wgmma_, 8);
  }
  return k;
}

bool CudaBackend::tiled_prefill(int64_t length, int64_t T) const {
  if (prefill_rows_ || T < 2 || dtype_ == DType::kF32) return false;
  const int64_t h = c_.heads_per_group();
  if (h > 16 || 16 % h != 0) return false;
  const int64_t nb_max = prefill_nb_max(length + T);
  return prefill_fits(prefill_set<__half>(nb_max), h, nb_max, dyn_smem_limit(SIZE_MAX, 0));
}

template <typename T>
void CudaBackend::enqueue_prefill_prepare(const StepParams& p) {
  const int64_t RG = p.R * p.G;
  float* u = gate_u_.as<float>();
  float* hid = u + RG * p.dk;
  launch("rope", cuda::nsa_prefill_rope_kernel<T>,
         dim3(static_cast<unsigned>((p.R + cuda::kRopeRows - 1) / cuda::kRopeRows)),
         dim3(cuda::kRopeThreads), cuda::prefill_rope_smem_bytes(p.dk), p, u);
  // hid^T [g_hid, RG] = fc1_w [g_hid, dk] u^T [dk, RG] (column-major views of row-major data).
  const float one = 1.f, zero = 0.f;
  NSA_CUBLAS_CHECK(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(p.g_hid),
                               static_cast<int>(RG), static_cast<int>(p.dk), &one,
                               fc1_w_.as<float>(), static_cast<int>(p.dk), u,
                               static_cast<int>(p.dk), &zero, hid, static_cast<int>(p.g_hid)));
  probe("gate_fc1");
  constexpr int64_t kVectorsPerBlock = cuda::kGateThreads / 32;
  launch("gates", cuda::nsa_prefill_gate_kernel,
         dim3(static_cast<unsigned>((RG + kVectorsPerBlock - 1) / kVectorsPerBlock)),
         dim3(cuda::kGateThreads), 0, p, static_cast<const float*>(hid));
}

template <typename T>
void CudaBackend::enqueue_prefill_kernels(const StepParams& p, int64_t nb_max) {
  const PrefillKernels k = prefill_set<T>(nb_max);
  const auto R = static_cast<unsigned>(p.R), RG = static_cast<unsigned>(p.R * p.G);
  const auto G = static_cast<unsigned>(p.G);
  // Many rows: small blocks of a few rows each keep more rows in flight per SM (a row is a
  // chain of dependent steps, not much work).
  if (prepare_split_ && p.dv % 2 == 0) {
    enqueue_prefill_prepare<T>(p);
  } else {
    constexpr int kPrepareRows = 4, kPrepareThreadsPrefill = 128;
    static_assert(kPrepareRows <= cuda::kMaxPrepareRows, "rows per prepare block");
    launch("prepare", cuda::nsa_prepare_kernel<T>, dim3((R + kPrepareRows - 1) / kPrepareRows, G),
           dim3(kPrepareThreadsPrefill), cuda::prepare_smem_bytes(p.h, p.dk, p.g_hid), p, 0,
           kPrepareRows);
  }
  launch("emit", cuda::nsa_emit_kernel<T>, dim3(R, G), dim3(128), 0, p);
  const int64_t queries = k.rows / p.h;  // per tile
  const auto tiles = static_cast<unsigned>((p.R + queries - 1) / queries);
  const bool clocks = p.stamps != nullptr && k.cmp_clock != nullptr;
  launch("prefill_cmp", clocks ? k.cmp_clock : k.cmp, dim3(tiles, G),
         dim3(static_cast<unsigned>(k.threads)),
         k.pipe_smem + cuda::prefill_score_smem(k.rows, p.h, nb_max), p, nb_max);
  launch("prefill_win", clocks ? k.win_clock : k.win, dim3(tiles, G),
         dim3(static_cast<unsigned>(k.threads)), k.pipe_smem, p);
  if (p.sel_forced_apart) {
    launch("prefill_fsel", k.fsel, dim3(tiles, G), dim3(static_cast<unsigned>(k.threads)),
           k.pipe_smem, p);
  }
  // The selected blocks, and the gated output of all three branches (p.sel_fused).
  launch("attn_sel_out", p.sel_forced_apart ? k.sel_forced : k.sel, dim3(RG), dim3(128), k.sel_smem,
         p, 1);
}

void CudaBackend::gemv_launch(const char* name, const void* w, const void* a, float* out, int64_t N,
                              int64_t K, int64_t R, int pdl) {
  const dim3 grid(
      static_cast<unsigned>((N + cuda::kGemvThreads / 32 - 1) / (cuda::kGemvThreads / 32)));
  const auto aligned = [&](size_t esize) {
    return (K * static_cast<int64_t>(esize)) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0;
  };
  const int n = static_cast<int>(N), k = static_cast<int>(K), r = static_cast<int>(R);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* wt = static_cast<const T*>(w);
    const T* at = static_cast<const T*>(a);
    if (aligned(sizeof(T))) {
      launch(name, cuda::nsa_gemv_kernel<T, true>, grid, dim3(cuda::kGemvThreads), 0, wt, at, out,
             n, k, r, pdl);
    } else {
      launch(name, cuda::nsa_gemv_kernel<T, false>, grid, dim3(cuda::kGemvThreads), 0, wt, at, out,
             n, k, r, pdl);
    }
  };
  switch (dtype_) {
    case DType::kF32:
      go(float{});
      break;
    case DType::kBF16:
      go(__nv_bfloat16{});
      break;
    case DType::kF16:
      go(__half{});
      break;
    default:
      NSA_FAIL("storage dtype {} is not supported by the CUDA backend", to_string(dtype_));
  }
}

void CudaBackend::enqueue_step(const StepParams& p, const void* x_dev, float* y_dev, bool gemms,
                               int attn_slot, int64_t tiled_nb_max) {
  const float one = 1.f, zero = 0.f;
  const cudaDataType_t t = cuda_type(dtype_);
  // proj [R, P] = x [R, dim] W_in^T (column-major view: proj^T = W_in x^T). Without the GEMMs
  // (attention-only timing) the kernels read the projection left by the previous step.
  const bool gemv = gemv_ && p.R <= cuda::kGemvMaxRows;
  if (gemms && gemv) {
    gemv_launch("gemv_in", w_in_.get(), x_dev, proj_.as<float>(), P_, c_.dim, p.R, p.pdl);
  } else if (gemms) {
    NSA_CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(P_),
                                  static_cast<int>(p.R), static_cast<int>(c_.dim), &one,
                                  w_in_.get(), t, static_cast<int>(c_.dim), x_dev, t,
                                  static_cast<int>(c_.dim), &zero, proj_.get(), CUDA_R_32F,
                                  static_cast<int>(P_), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    probe("gemm_in");
  }
  if (attn_slot >= 0) NSA_CUDA_CHECK(cudaEventRecord(attn_events_[attn_slot][0], stream_));
  switch (dtype_) {
    case DType::kF32:
      enqueue_kernels<float>(p);
      break;
    case DType::kBF16:
      if (tiled_nb_max > 0) {
        enqueue_prefill_kernels<__nv_bfloat16>(p, tiled_nb_max);
      } else {
        enqueue_kernels<__nv_bfloat16>(p);
      }
      break;
    case DType::kF16:
      if (tiled_nb_max > 0) {
        enqueue_prefill_kernels<__half>(p, tiled_nb_max);
      } else {
        enqueue_kernels<__half>(p);
      }
      break;
    default:
      NSA_FAIL("storage dtype {} is not supported by the CUDA backend", to_string(dtype_));
  }
  if (attn_slot >= 0) NSA_CUDA_CHECK(cudaEventRecord(attn_events_[attn_slot][1], stream_));
  if (!gemms) return;
  const int HDV = static_cast<int>(c_.heads * c_.dv);
  if (gemv) {
    gemv_launch("gemv_out", w_out_.get(), o_.get(), y_dev, c_.dim, HDV, p.R, p.pdl);
    return;
  }
  NSA_CUBLAS_CHECK(cublasGemmEx(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(c_.dim),
                                static_cast<int>(p.R), HDV, &one, w_out_.get(), t, HDV, o_.get(), t,
                                HDV, &zero, y_dev, CUDA_R_32F, static_cast<int>(c_.dim),
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  probe("gemm_out");
}

void CudaBackend::forward(CacheState& state, const float* x, int64_t T, float* y,
                          Inspection* inspect) {
  auto& cache = static_cast<CudaCache&>(state);
  const int64_t B = cache.batch, rows = B * T;
  // Host-side phases in ms (printed with NSA_CUDA_KERNEL_TIMES=1 or NSA_CUDA_HOST_TIMES=1):
  // reserve, prepare, convert, wait (the launch's device work and copies, host blocked), copy
  // out (y to the host), total.
  const auto t_start = Clock::now();
  double host_ms[5] = {0, 0, 0, 0, 0};
  reserve(cache, cache.length + T);
  host_ms[0] = ms_since(t_start);
  const bool all = inspect != nullptr && inspect->want.any();
  const bool tiled = tiled_prefill(cache.length, T);
  // Rows per launch: bounded so the per-row workspace stays modest. The step kernels keep
  // compressed logits per row, and fewer rows get more splits each, so settle the two together.
  // The tiled prefill launches rows of one sequence at a time (its tiles are consecutive
  // positions), with one compressed and one window partial per row.
  int64_t chunk = std::min<int64_t>(tiled ? T : rows, tiled ? 8192 : 4096);
  for (int pass = 0; pass < 3; ++pass) {
    const StepParams shape = params(cache, T, 0, chunk, all, 0);
    const int64_t splits = tiled ? 3 : cuda::n_splits_total(shape);
    const int64_t per_row =
        (tiled ? c_.groups * (c_.dk + c_.gate_hidden) * 4 : c_.heads * cache.cap_cmp * 4) +
        splits * c_.heads * (c_.dv + 2) * 4 + 3 * c_.heads * c_.dv * 4 + P_ * 4 + c_.dim * 8 +
        c_.heads * (c_.dk + c_.dv) * 2;
    const int64_t budget = tiled ? prefill_workspace_ : int64_t{256} << 20;
    chunk = std::clamp<int64_t>(budget / per_row, 1, chunk);
  }
  if (prefill_chunk_ > 0) chunk = std::min(chunk, prefill_chunk_);
  attention_ms_ = 0.0;
  // Development aid: NSA_CUDA_KERNEL_TIMES=1 puts an event after every kernel and prints each
  // kernel's time summed over the launches to stderr.
  const bool kernel_times = kernel_times_;
  std::vector<std::pair<std::string, double>> kernel_ms;
  // NSA_CUDA_KERNEL_TIMES=2: the tiled kernels' phase clocks, summed over every block.
  DeviceBuffer clocks;
  if (phase_clocks_ && tiled) {
    clocks = DeviceBuffer(sizeof(long long) * 2 * cuda::kPfPhases);
    NSA_CUDA_CHECK(cudaMemsetAsync(clocks.get(), 0, clocks.bytes(), stream_));
  }
  // Launches: [row0, row0 + R) of the B * T rows; with the tiled prefill never across sequences.
  // Two launch slots (input staging, output buffer, attention events): launch k + 1 is enqueued
  // before launch k's output is copied out, so the host's conversions and copies of one launch
  // overlap the device work of the next. With per-kernel times or inspection, one at a time.
  const bool overlap = overlap_launches_ && !kernel_times && !all;
  struct Launch {
    int64_t row0, R;
    int slot;
  };
  auto y_dev = [&](int s) { return s == 0 ? y_.as<float>() : y_alt_.as<float>(); };
  const size_t stage_bytes = static_cast<size_t>(chunk * c_.dim) * esize_;
  auto* x_stage = static_cast<unsigned char*>(x_host_.reserve(2 * stage_bytes));
  // The launch's output to y, its attention time to attention_ms_.
  auto finish = [&](const Launch& L) {
    copy_out(y_dev(L.slot), y + L.row0 * c_.dim, L.R * c_.dim, launch_done_[L.slot], host_ms[3],
             host_ms[4]);
    float ms = 0.f;
    NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, attn_events_[L.slot][0], attn_events_[L.slot][1]));
    attention_ms_ += ms;
  };
  std::optional<Launch> pending;  // enqueued, output not yet copied out
  int slot = 0;
  const int64_t span = tiled ? T : rows;
  for (int64_t base = 0; base < rows; base += span) {
    for (int64_t off = 0; off < span; off += chunk) {
      const int64_t row0 = base + off, R = std::min(chunk, span - off);
      const int64_t advance = row0 + R == rows ? T : 0;
      auto t0 = Clock::now();
      StepParams p = prepared(cache, T, row0, R, all, advance, tiled);
      if (clocks.get() != nullptr) p.stamps = clocks.as<long long>();
      host_ms[1] += ms_since(t0);
      // This slot's staging buffer was last copied from two launches ago, and that launch has
      // been finished since: convert this launch's rows into it and copy them over.
      t0 = Clock::now();
      const size_t x_bytes = static_cast<size_t>(R * c_.dim) * esize_;
      void* staged = x_stage + static_cast<size_t>(slot) * stage_bytes;
      convert_from_f32(x + row0 * c_.dim, R * c_.dim, dtype_, staged);
      host_ms[2] += ms_since(t0);
      NSA_CUDA_CHECK(cudaMemcpyAsync(x_.get(), staged, x_bytes, cudaMemcpyHostToDevice, stream_));
      std::vector<std::pair<const char*, cudaEvent_t>> events;
      if (kernel_times) {
        probes_ = &events;
        probe("start");
      }
      enqueue_step(p, x_.get(), y_dev(slot), true, slot,
                   tiled ? prefill_nb_max(cache.length + off + R) : 0);
      probes_ = nullptr;
      if (all) {
        auto back = [&](Tensor& dst, const DeviceBuffer& src, int64_t per) {
          if (dst.empty()) return;
          const size_t bytes = static_cast<size_t>(R * per) * 4;
          NSA_CUDA_CHECK(cudaMemcpyAsync(dst.raw() + static_cast<size_t>(row0 * per) * 4, src.get(),
                                         bytes, cudaMemcpyDeviceToHost, stream_));
        };
        back(inspect->gates, gates_, c_.groups * 3);
        back(inspect->sel_blocks, sel_blocks_, c_.groups * c_.n_sel);
        back(inspect->o_cmp, o_cmp_, c_.heads * c_.dv);
        back(inspect->o_sel, o_sel_, c_.heads * c_.dv);
        back(inspect->o_win, o_win_, c_.heads * c_.dv);
        back(inspect->reads, reads_, c_.groups * 3);
      }
      NSA_CUDA_CHECK(cudaEventRecord(launch_done_[slot], stream_));
      const Launch now{row0, R, slot};
      slot ^= 1;
      if (overlap) {
        if (pending) finish(*pending);
        pending = now;
        continue;
      }
      // One launch at a time: its output, then its per-kernel times.
      t0 = Clock::now();
      NSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
      host_ms[3] += ms_since(t0);
      finish(now);
      float ms = 0.f;
      for (size_t k = 1; k < events.size(); ++k) {
        NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, events[k - 1].second, events[k].second));
        auto it = std::find_if(kernel_ms.begin(), kernel_ms.end(),
                               [&](const auto& e) { return e.first == events[k].first; });
        if (it == kernel_ms.end()) it = kernel_ms.insert(kernel_ms.end(), {events[k].first, 0.0});
        it->second += ms;
      }
      for (auto& e : events) cudaEventDestroy(e.second);
    }
  }
  if (pending) finish(*pending);
  if (tiled) {  // every launch has read the old length; now the device copy advances
    const int64_t length = cache.length + T;
    NSA_CUDA_CHECK(cudaMemcpyAsync(cache.len.get(), &length, sizeof(int64_t),
                                   cudaMemcpyHostToDevice, stream_));
    NSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  if (kernel_times) {
    std::string line;
    for (const auto& [name, ms] : kernel_ms) line += fmt::format(" {} {:.3f}", name, ms);
    fmt::print(stderr, "forward T={} kernel ms (summed over {} rows):{}\n", T, rows, line);
  }
  if (kernel_times || host_times_) {
    fmt::print(stderr,
               "forward T={} host ms: reserve {:.1f} prepare {:.1f} convert {:.1f} wait {:.1f} "
               "copy out {:.1f} total {:.1f}\n",
               T, host_ms[0], host_ms[1], host_ms[2], host_ms[3], host_ms[4], ms_since(t_start));
  }
  if (clocks.get() != nullptr) print_phase_clocks(clocks, T);
  cache.length += T;
}

// The phase clocks the tiled prefill kernels summed (NSA_CUDA_KERNEL_TIMES=2): SM clocks per
// block, averaged over the blocks, per phase and kernel, to stderr.
void CudaBackend::print_phase_clocks(const DeviceBuffer& clocks, int64_t T) const {
  std::vector<long long> c(2 * cuda::kPfPhases);
  NSA_CUDA_CHECK(cudaMemcpy(c.data(), clocks.get(), clocks.bytes(), cudaMemcpyDeviceToHost));
  static constexpr const char* kNames[cuda::kPfTopN + 1] = {
      "setup",   "p1_wait",   "p1_logits", "p1_softmax", "p1_pv",     "p1_barrier", "p1_store",
      "p2_wait", "p2_logits", "p2_exp",    "p2_barrier", "p2_spread", "topn"};
  for (int k = 0; k < 2; ++k) {
    const long long* v = c.data() + k * cuda::kPfPhases;
    const long long blocks = v[cuda::kPfBlocks];
    if (blocks == 0) {
      fmt::print(
          stderr,
          "forward T={} {} phases: no clocks (only the paper's head dims in 4-warp blocks)\n", T,
          k == 0 ? "prefill_cmp" : "prefill_win");
      continue;
    }
    long long total = 0;
    for (int i = 0; i <= cuda::kPfTopN; ++i) total += v[i];
    std::string line;
    for (int i = 0; i <= cuda::kPfTopN; ++i) {
      if (v[i] == 0) continue;
      line += fmt::format(" {} {:.0f} ({:.1f}%)", kNames[i], static_cast<double>(v[i]) / blocks,
                          100.0 * static_cast<double>(v[i]) / static_cast<double>(total));
    }
    fmt::print(stderr,
               "forward T={} {} phases (SM clocks per block, mean of {} blocks, thread 0): "
               "total {:.0f}:{}\n",
               T, k == 0 ? "prefill_cmp" : "prefill_win", blocks,
               static_cast<double>(total) / blocks, line);
  }
}

// kind: 0 f32, 1 bf16, 2 f16.
__global__ void nsa_fill_random_kernel(void* dst, int kind, int64_t BG, int64_t cap, int64_t width,
                                       int64_t pos0, int64_t S, uint64_t seed) {
  const int64_t n = BG * S * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bg = i / (S * width), pos = pos0 + (i / width) % S, e = i % width;
    uint64_t z = seed ^ (static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float v = (static_cast<float>(z >> 40) * (1.f / 16777216.f) * 2.f - 1.f) *
                    1.7320508f;  // unit variance
    const int64_t at = (bg * cap + pos) * width + e;
    if (kind == 0) {
      static_cast<float*>(dst)[at] = v;
    } else if (kind == 2) {
      static_cast<__half*>(dst)[at] = __float2half_rn(v);
    } else {
      static_cast<__nv_bfloat16*>(dst)[at] = __float2bfloat16_rn(v);
    }
  }
}

void CudaBackend::fill_random(CacheState& state, int64_t S, uint64_t seed) {
  auto& cache = static_cast<CudaCache&>(state);
  reserve(cache, cache.length + S);
  const int64_t BG = cache.batch * c_.groups;
  uint64_t salt = seed * 6 + 12345;
  for (auto [buf, width] : cache.raw_arrays(c_.dk, c_.dv)) {
    const int kind = dtype_ == DType::kF32 ? 0 : dtype_ == DType::kBF16 ? 1 : 2;
    nsa_fill_random_kernel<<<1024, 256, 0, stream_>>>(buf->get(), kind, BG, cache.cap, width,
                                                      cache.length, S, ++salt);
    NSA_CUDA_CHECK_LAUNCH();
  }
  // Emit the compressed tokens of the new positions with the regular kernel (rows = B * S).
  const StepParams p = params(cache, S, 0, cache.batch * S, false, 0);  // no workspace needed
  auto emit = dtype_ == DType::kF32    ? cuda::nsa_emit_kernel<float>
              : dtype_ == DType::kBF16 ? cuda::nsa_emit_kernel<__nv_bfloat16>
                                       : cuda::nsa_emit_kernel<__half>;
  launch("emit", emit,
         dim3(static_cast<unsigned>(cache.batch * S), static_cast<unsigned>(c_.groups)), dim3(128),
         0, p);
  cache.length += S;
  NSA_CUDA_CHECK(cudaMemcpyAsync(cache.len.get(), &cache.length, sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream_));
  NSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::vector<double> CudaBackend::time_decode(CacheState& state, const std::vector<const float*>& xs,
                                             int64_t warmup, float* /*y_scratch*/,
                                             bool attention_only) {
  auto& cache = static_cast<CudaCache&>(state);
  const int64_t B = cache.batch, n = static_cast<int64_t>(xs.size());
  // Development aid: NSA_CUDA_KERNEL_TIMES=1 first runs the same steps eagerly with an event
  // after every kernel and prints each kernel's median time to stderr (the cache then advances
  // by 2 n steps).
  const bool kernel_times = kernel_times_;
  reserve(cache, cache.length + (kernel_times ? 2 * n : n));
  std::vector<uint8_t> host;
  for (const float* x : xs) {
    const auto s = to_storage(x, B * c_.dim, dtype_);
    host.insert(host.end(), s.begin(), s.end());
  }
  DeviceBuffer pool(host.size());
  NSA_CUDA_CHECK(cudaMemcpy(pool.get(), host.data(), host.size(), cudaMemcpyHostToDevice));
  const StepParams p = prepared(cache, 1, 0, B, false, 1);
  const size_t step_bytes = static_cast<size_t>(B * c_.dim) * esize_;
  if (kernel_times) {
    std::vector<std::pair<const char*, std::vector<float>>> per_kernel;
    // The fused kernel's phases, in SM clocks of its block (0, 0), each step's differences.
    StepParams pe = p;
    DeviceBuffer stamps(sizeof(long long) * cuda::kFusedStamps);
    std::vector<std::vector<long long>> phases(cuda::kFusedStamps - 1);
    if (p.fused_decode || p.short_decode) pe.stamps = stamps.as<long long>();
    for (int64_t i = 0; i < n; ++i) {
      NSA_CUDA_CHECK(cudaMemcpyAsync(x_.get(), pool.as<uint8_t>() + i * step_bytes, step_bytes,
                                     cudaMemcpyDeviceToDevice, stream_));
      std::vector<std::pair<const char*, cudaEvent_t>> events;
      probes_ = &events;
      probe("start");
      if (pe.stamps) NSA_CUDA_CHECK(cudaMemsetAsync(stamps.get(), 0, stamps.bytes(), stream_));
      enqueue_step(pe, x_.get(), y_.as<float>(), !attention_only);
      probes_ = nullptr;
      NSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (pe.stamps && i >= warmup) {
        long long st[cuda::kFusedStamps];
        NSA_CUDA_CHECK(cudaMemcpy(st, stamps.get(), sizeof(st), cudaMemcpyDeviceToHost));
        for (int k = 1; k < cuda::kFusedStamps; ++k)
          if (st[k] != 0) phases[k - 1].push_back(st[k] - st[k - 1]);
      }
      if (per_kernel.empty()) {
        for (size_t k = 1; k < events.size(); ++k)
          per_kernel.emplace_back(events[k].first, std::vector<float>{});
      }
      for (size_t k = 1; k < events.size() && i >= warmup; ++k) {
        float ms = 0.f;
        NSA_CUDA_CHECK(cudaEventElapsedTime(&ms, events[k - 1].second, events[k].second));
        per_kernel[k - 1].second.push_back(ms * 1000.f);
      }
      for (auto& e : events) cudaEventDestroy(e.second);
    }
    cache.length += n;
    std::string line;
    for (auto& [name, us] : per_kernel) line += fmt::format(" {} {:.1f}", name, upper_median(us));
    fmt::print(stderr, "kernel us (median, eager):{}\n", line);
    if (pe.stamps) {
      const char* fused_names[] = {"prepare", "cmp", "score", "select", "sel", "win", "finish"};
      const char* short_names[] = {"length", "loads",    "rope+emit", "logits+gate",
                                   "select", "partials", "combine"};
      const char* const* names = p.short_decode ? short_names : fused_names;
      line.clear();
      for (int k = 0; k + 1 < cuda::kFusedStamps; ++k)
        line += fmt::format(" {} {}", names[k], upper_median(phases[static_cast<size_t>(k)]));
      fmt::print(
          stderr, "{} phases, SM clocks (median, {}):{}\n", p.short_decode ? "short" : "fused",
          p.short_decode ? "the block of sequence 0, group 0 holding the new token" : "block 0",
          line);
    }
  }
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  NSA_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  enqueue_step(p, x_.get(), y_.as<float>(), !attention_only);
  NSA_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  NSA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<cudaEvent_t> ev(static_cast<size_t>(2 * n));
  for (auto& e : ev) NSA_CUDA_CHECK(cudaEventCreate(&e));
  for (int64_t i = 0; i < n; ++i) {
    NSA_CUDA_CHECK(cudaMemcpyAsync(x_.get(), pool.as<uint8_t>() + i * step_bytes, step_bytes,
                                   cudaMemcpyDeviceToDevice, stream_));
    NSA_CUDA_CHECK(cudaEventRecord(ev[static_cast<size_t>(2 * i)], stream_));
    NSA_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    NSA_CUDA_CHECK(cudaEventRecord(ev[static_cast<size_t>(2 * i + 1)], stream_));
  }
  NSA_CUDA_CHECK(cudaStreamSynchronize(stream_));
  std::vector<double> ms;
  for (int64_t i = warmup; i < n; ++i) {
    float t = 0.f;
    NSA_CUDA_CHECK(cudaEventElapsedTime(&t, ev[static_cast<size_t>(2 * i)],
                                        ev[static_cast<size_t>(2 * i + 1)]));
    ms.push_back(t);
  }
  for (auto& e : ev) cudaEventDestroy(e);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cache.length += n;
  return ms;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const Config& config, const LayerWeights& weights,
                                           const LayerOptions& options) {
  return std::make_unique<CudaBackend>(config, weights, options);
}

}  // namespace nsa
