// CPU kernels of explainrt.kernels (module explainrt.kernels._cpu): C++17 + OpenMP.
//
// Same semantics as the NumPy reference in explainrt/kernels/_numpy.py, which the tests compare
// against. Inputs are validated and converted to float32 C-contiguous arrays by the Python layer;
// the checks here only keep a direct caller from reading out of bounds.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
using Array = py::array_t<float, py::array::c_style>;

namespace {

constexpr float kCamEps = 1e-7f;   // pytorch-grad-cam scale_cam_image
constexpr float kMaskEps = 1e-8f;  // pytorch-grad-cam ScoreCAM.get_cam_weights
// Below this many floats of work a call runs on one thread: forking and joining would cost
// more than it saves, and a worker preempted by the runtime's own spinning thread pool (ONNX
// Runtime's intra-op threads spin after each run) stalls the barrier for milliseconds. A CAM
// batch ([8, 2048, 7, 7] -> 8 x 224 x 224) is well under a millisecond on one core.
constexpr int64_t kParallelGrain = 1 << 21;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// Interpolation table for one axis: out[i] = src[lo[i]] * w_lo[i] + src[hi[i]] * w_hi[i].
struct Axis {
  std::vector<int64_t> lo, hi;
  std::vector<float> w_lo, w_hi;

  explicit Axis(int64_t n) : lo(n), hi(n), w_lo(n), w_hi(n) {}
  int64_t size() const { return static_cast<int64_t>(lo.size()); }
};

// cv2.resize INTER_LINEAR: src = (dst + 0.5) * in / out - 0.5 in double, clamped to the edges.
Axis half_pixel_axis(int64_t n_in, int64_t n_out) {
  Axis axis(n_out);
  const double scale = 1.0 / (static_cast<double>(n_out) / n_in);
  for (int64_t i = 0; i < n_out; ++i) {
    const double src = (i + 0.5) * scale - 0.5;
    int64_t lo = static_cast<int64_t>(std::floor(src));
    float frac = static_cast<float>(src - lo);
    if (lo < 0 || lo >= n_in - 1) {
      frac = 0.f;
      lo = std::clamp<int64_t>(lo, 0, n_in - 1);
    }
    axis.lo[i] = lo;
    axis.hi[i] = std::min(lo + 1, n_in - 1);
    axis.w_lo[i] = 1.f - frac;
    axis.w_hi[i] = frac;
  }
  return axis;
}

// torch bilinear with align_corners=True: src = dst * (in - 1) / (out - 1), all in float.
Axis align_corners_axis(int64_t n_in, int64_t n_out) {
  Axis axis(n_out);
  const float scale =
      n_out > 1 ? static_cast<float>(n_in - 1) / static_cast<float>(n_out - 1) : 0.f;
  for (int64_t i = 0; i < n_out; ++i) {
    const float src = scale * static_cast<float>(i);
    const int64_t lo = std::min(static_cast<int64_t>(src), n_in - 1);
    const float frac = src - static_cast<float>(lo);
    axis.lo[i] = lo;
    axis.hi[i] = std::min(lo + 1, n_in - 1);
    axis.w_lo[i] = 1.f - frac;
    axis.w_hi[i] = frac;
  }
  return axis;
}

// Width pass of one source row (OpenCV resizes along width first).
inline void resize_row(const float* src, float* dst, const Axis& cols) {
  for (int64_t x = 0; x < cols.size(); ++x)
    dst[x] = src[cols.lo[x]] * cols.w_lo[x] + src[cols.hi[x]] * cols.w_hi[x];
}

// Height pass for output row y of one plane, from its width-resized rows `across` [h, W].
inline void blend_rows(const float* across, float* dst, const Axis& rows, int64_t y, int64_t W) {
  const float* a = across + rows.lo[y] * W;
  const float* b = across + rows.hi[y] * W;
  const float wa = rows.w_lo[y], wb = rows.w_hi[y];
  for (int64_t x = 0; x < W; ++x) dst[x] = a[x] * wa + b[x] * wb;
}

// (x - min) / (eps + max - min) in place; equals scale_cam_image's img - min, / (eps + max).
void minmax_normalize(float* p, int64_t n, float eps) {
  const auto [lo, hi] = std::minmax_element(p, p + n);
  const float mn = *lo;
  const float denom = (*hi - mn) + eps;
  for (int64_t i = 0; i < n; ++i) p[i] = (p[i] - mn) / denom;
}

// Resize `planes` maps [h, w] -> [H, W], split over the rows of all planes so that a small
// batch still spreads over the threads. Call it inside the caller's parallel region (the loops
// are orphaned worksharing). `across` is scratch of planes * h * W floats.
void resize_planes(const float* src, float* dst, float* across, int64_t planes, int64_t h,
                   int64_t w, const Axis& rows, const Axis& cols) {
  const int64_t H = rows.size(), W = cols.size();
#pragma omp for schedule(static)
  for (int64_t r = 0; r < planes * h; ++r) resize_row(src + r * w, across + r * W, cols);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < planes * H; ++r)
    blend_rows(across + (r / H) * h * W, dst + r * W, rows, r % H, W);
}

// One map before resizing: ReLU(sum_c weights * activations), then min-max normalised if asked.
// Channel-sequential float32 sum, the order NumPy uses for .sum(axis=1).
void small_cam(const float* act, const float* wgt, bool per_pixel, bool normalize, int64_t C,
               int64_t hw, float* cam) {
  for (int64_t c = 0; c < C; ++c) {
    const float* a = act + c * hw;
    if (per_pixel) {
      const float* wc = wgt + c * hw;
      for (int64_t p = 0; p < hw; ++p) cam[p] += wc[p] * a[p];
    } else {
      const float wc = wgt[c];
      for (int64_t p = 0; p < hw; ++p) cam[p] += wc * a[p];
    }
  }
  for (int64_t p = 0; p < hw; ++p) cam[p] = std::max(cam[p], 0.f);
  if (normalize) minmax_normalize(cam, hw, kCamEps);
}

std::vector<py::ssize_t> shape_of(const Array& a) { return {a.shape(), a.shape() + a.ndim()}; }

Array cam_maps(const Array& activations, const Array& weights, int64_t out_h, int64_t out_w,
               bool normalize) {
  require(activations.ndim() == 4, "activations must be [N, C, h, w]");
  require(out_h > 0 && out_w > 0, "out_h and out_w must be positive");
  const int64_t N = activations.shape(0), C = activations.shape(1);
  const int64_t h = activations.shape(2), w = activations.shape(3), hw = h * w;
  require(h > 0 && w > 0, "activations must have a non-empty spatial size");
  const bool per_pixel = weights.ndim() == 4;
  require(per_pixel ? shape_of(weights) == shape_of(activations)
                    : weights.ndim() == 2 && weights.shape(0) == N && weights.shape(1) == C,
          "weights must be [N, C] or [N, C, h, w] matching activations");

  const Axis rows = half_pixel_axis(h, out_h), cols = half_pixel_axis(w, out_w);
  Array out({N, out_h, out_w});
  std::vector<float> cams(N * hw, 0.f), across(N * h * out_w);
  const float* act = activations.data();
  const float* wgt = weights.data();
  float* dst = out.mutable_data();
  const bool parallel = N * std::max(C * hw, out_h * out_w) >= kParallelGrain;
  {
    py::gil_scoped_release release;
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        small_cam(act + n * C * hw, wgt + n * C * (per_pixel ? hw : 1), per_pixel, normalize, C, hw,
                  cams.data() + n * hw);
      resize_planes(cams.data(), dst, across.data(), N, h, w, rows, cols);
    }
  }
  return out;
}

Array resize_bilinear(const Array& maps, int64_t out_h, int64_t out_w) {
  require(maps.ndim() == 3, "maps must be [N, h, w]");
  require(out_h > 0 && out_w > 0, "out_h and out_w must be positive");
  const int64_t N = maps.shape(0), h = maps.shape(1), w = maps.shape(2);
  require(h > 0 && w > 0, "maps must have a non-empty spatial size");

  const Axis rows = half_pixel_axis(h, out_h), cols = half_pixel_axis(w, out_w);
  Array out({N, out_h, out_w});
  std::vector<float> across(N * h * out_w);
  const float* src = maps.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel if (N * out_h * out_w >= kParallelGrain)
    resize_planes(src, dst, across.data(), N, h, w, rows, cols);
  }
  return out;
}

Array normalize_minmax(const Array& maps) {
  require(maps.ndim() == 3, "maps must be [N, H, W]");
  const int64_t N = maps.shape(0), hw = maps.shape(1) * maps.shape(2);
  require(hw > 0, "maps must have a non-empty spatial size");

  Array out({N, maps.shape(1), maps.shape(2)});
  const float* src = maps.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (N * hw >= kParallelGrain)
    for (int64_t n = 0; n < N; ++n) {
      std::copy(src + n * hw, src + (n + 1) * hw, dst + n * hw);
      minmax_normalize(dst + n * hw, hw, kCamEps);
    }
  }
  return out;
}

Array channel_masks(const Array& activations, int64_t out_h, int64_t out_w) {
  require(activations.ndim() == 4, "activations must be [N, C, h, w]");
  require(out_h > 0 && out_w > 0, "out_h and out_w must be positive");
  const int64_t N = activations.shape(0), C = activations.shape(1);
  const int64_t h = activations.shape(2), w = activations.shape(3);
  require(h > 0 && w > 0, "activations must have a non-empty spatial size");

  const Axis rows = align_corners_axis(h, out_h), cols = align_corners_axis(w, out_w);
  Array out({N, C, out_h, out_w});
  const float* src = activations.data();
  float* dst = out.mutable_data();
  const int64_t planes = N * C, in_plane = h * w, out_plane = out_h * out_w;
  {
    py::gil_scoped_release release;
    // One plane per task: there are N * C of them, and each stays in cache while normalised.
#pragma omp parallel if (planes * out_plane >= kParallelGrain)
    {
      std::vector<float> across(h * out_w);
#pragma omp for schedule(static)
      for (int64_t p = 0; p < planes; ++p) {
        for (int64_t r = 0; r < h; ++r)
          resize_row(src + p * in_plane + r * w, across.data() + r * out_w, cols);
        float* plane = dst + p * out_plane;
        for (int64_t y = 0; y < out_h; ++y)
          blend_rows(across.data(), plane + y * out_w, rows, y, out_w);
        minmax_normalize(plane, out_plane, kMaskEps);
      }
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "OpenMP CPU kernels of explainrt.kernels; call them through explainrt.kernels.";
  m.def("cam_maps", &cam_maps, py::arg("activations"), py::arg("weights"), py::arg("out_h"),
        py::arg("out_w"), py::arg("normalize") = true,
        "Fused weighted sum, ReLU, min-max normalisation (optional) and cv2 resize.");
  m.def("resize_bilinear", &resize_bilinear, py::arg("maps"), py::arg("out_h"), py::arg("out_w"),
        "cv2.resize INTER_LINEAR of each [h, w] map.");
  m.def("normalize_minmax", &normalize_minmax, py::arg("maps"),
        "scale_cam_image's per-map min-max normalisation.");
  m.def("channel_masks", &channel_masks, py::arg("activations"), py::arg("out_h"),
        py::arg("out_w"), "Score-CAM masks: align-corners upsampling, per-channel min-max.");
}
