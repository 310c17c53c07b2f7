// CPU kernels of explainrt.kernels (module explainrt.kernels._cpu): C++17 + OpenMP.
//
// Same semantics as the NumPy reference in explainrt/kernels/_numpy.py, which the tests compare
// against. Inputs are validated and converted to float32 C-contiguous arrays by the Python layer;
// the checks here only keep a direct caller from reading out of bounds.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
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
// Kernels that only stream memory (apply masks, segment and occlusion masks) gain little from a
// second thread and lose milliseconds when a worker is preempted: they stay serial up to here.
constexpr int64_t kStreamingGrain = 1 << 25;

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

// --- perturbation masks -----------------------------------------------------------------------

using IntArray = py::array_t<int32_t, py::array::c_style>;

// image * m + baseline * (1 - m) for every mask: [B, C, H, W]. Masks are [B, H, W] (shared by
// the channels) or [B, C, H, W]; baseline is one value or [C, H, W].
Array apply_masks(const Array& image, const Array& masks, const Array& baseline) {
  require(image.ndim() == 3, "image must be [C, H, W]");
  const int64_t C = image.shape(0), hw = image.shape(1) * image.shape(2);
  const bool per_channel = masks.ndim() == 4;
  require((masks.ndim() == 3 || per_channel) && masks.shape(masks.ndim() - 2) == image.shape(1) &&
              masks.shape(masks.ndim() - 1) == image.shape(2) && (!per_channel || masks.shape(1) == C),
          "masks must be [B, H, W] or [B, C, H, W] matching image");
  const bool one_value = baseline.size() == 1;
  require(one_value || baseline.size() == C * hw, "baseline must be one value or [C, H, W]");
  const int64_t B = masks.shape(0);
  Array out({B, C, image.shape(1), image.shape(2)});
  const float* img = image.data();
  const float* msk = masks.data();
  const float* base = baseline.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) collapse(2) if (B * C * hw >= kStreamingGrain)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float* m = msk + (per_channel ? (b * C + c) * hw : b * hw);
        const float* x = img + c * hw;
        float* o = dst + (b * C + c) * hw;
        if (one_value) {
          const float v = base[0];
          for (int64_t p = 0; p < hw; ++p) o[p] = x[p] * m[p] + v * (1.f - m[p]);
        } else {
          const float* v = base + c * hw;
          for (int64_t p = 0; p < hw; ++p) o[p] = x[p] * m[p] + v[p] * (1.f - m[p]);
        }
      }
  }
  return out;
}

// Pixel (y, x) of mask b takes on_off[b, segments[y, x]]: [B, H, W].
Array segment_masks(const IntArray& segments, const Array& on_off) {
  require(segments.ndim() == 2 && on_off.ndim() == 2, "segments must be [H, W] and on_off [B, S]");
  const int64_t B = on_off.shape(0), S = on_off.shape(1), hw = segments.size();
  const int32_t* seg = segments.data();
  for (int64_t p = 0; p < hw; ++p) require(seg[p] >= 0 && seg[p] < S, "segment labels must lie in 0..S-1");
  Array out({B, static_cast<int64_t>(segments.shape(0)), static_cast<int64_t>(segments.shape(1))});
  const float* states = on_off.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (B * hw >= kStreamingGrain)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < hw; ++p) dst[b * hw + p] = states[b * S + seg[p]];
  }
  return out;
}

// sum_b scores[b, t] * masks[b] -> [T, H, W], each output accumulated in double, rounded once.
Array accumulate_scores(const Array& scores, const Array& masks) {
  require(masks.ndim() == 3 && scores.ndim() == 2 && scores.shape(0) == masks.shape(0),
          "scores must be [B, T] and masks [B, H, W]");
  const int64_t B = masks.shape(0), T = scores.shape(1), hw = masks.shape(1) * masks.shape(2);
  Array out({T, static_cast<int64_t>(masks.shape(1)), static_cast<int64_t>(masks.shape(2))});
  const float* w = scores.data();
  const float* m = masks.data();
  float* dst = out.mutable_data();
  constexpr int64_t kTile = 256;  // pixels per task: the tile of every mask stays in cache
  {
    py::gil_scoped_release release;
#pragma omp parallel if (B * T * hw >= kParallelGrain)
    {
      std::vector<double> acc(kTile);
#pragma omp for schedule(static)
      for (int64_t start = 0; start < hw; start += kTile) {
        const int64_t len = std::min(kTile, hw - start);
        for (int64_t t = 0; t < T; ++t) {
          std::fill(acc.begin(), acc.begin() + len, 0.0);
          for (int64_t b = 0; b < B; ++b) {
            const double wb = w[b * T + t];
            const float* row = m + b * hw + start;
            for (int64_t p = 0; p < len; ++p) acc[p] += wb * row[p];
          }
          for (int64_t p = 0; p < len; ++p) dst[t * hw + start + p] = static_cast<float>(acc[p]);
        }
      }
    }
  }
  return out;
}

// SplitMix64 finaliser (Steele et al. 2014) and the counter-based uniform of _numpy.counter_uniform.
inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline double counter_uniform(uint64_t seed, uint64_t index, uint64_t slot) {
  const uint64_t key = splitmix64(seed ^ splitmix64(index));
  return static_cast<double>(splitmix64(key + slot) >> 11) * 0x1.0p-53;
}

// ndimage 'mirror' (skimage 'reflect'): reflect about the edge pixel centres.
inline int64_t mirror(int64_t i, int64_t n) {
  if (n == 1) return 0;
  i = i < 0 ? -i : i;
  return i > n - 1 ? 2 * (n - 1) - i : i;
}

struct RiseTap {
  int64_t lo, hi;
  double w_lo, w_hi;
};

// Half-pixel bilinear tap of pixel `pos` of the (grid+1)*cell upsampled axis.
inline RiseTap rise_tap(double pos, int64_t grid, int64_t cell) {
  const double up = static_cast<double>((grid + 1) * cell);
  const double src = (pos + 0.5) * static_cast<double>(grid) / up - 0.5;
  const double lo = std::floor(src);
  const double frac = src - lo;
  const int64_t l = static_cast<int64_t>(lo);
  return {mirror(l, grid), mirror(l + 1, grid), 1.0 - frac, frac};
}

// RISE masks first..first+count-1 [count, H, W]; see _numpy.rise_masks.
Array rise_masks(uint64_t seed, int64_t first, int64_t count, int64_t grid, double p, int64_t out_h,
                 int64_t out_w) {
  require(first >= 0 && count >= 0 && grid >= 1 && out_h > 0 && out_w > 0 && p > 0 && p < 1,
          "rise_masks needs first, count >= 0, grid >= 1, 0 < p < 1 and a positive size");
  const int64_t cell_h = (out_h + grid - 1) / grid, cell_w = (out_w + grid - 1) / grid;
  const int64_t cells = grid * grid;
  Array out({count, out_h, out_w});
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel if (count * out_h * out_w >= kParallelGrain)
    {
      std::vector<double> g(cells);
      std::vector<RiseTap> cols(out_w);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < count; ++j) {
        const uint64_t index = static_cast<uint64_t>(first + j);
        for (int64_t k = 0; k < cells; ++k)
          g[k] = counter_uniform(seed, index, static_cast<uint64_t>(k)) < p ? 1.0 : 0.0;
        const double dy = std::floor(counter_uniform(seed, index, cells) * cell_h);
        const double dx = std::floor(counter_uniform(seed, index, cells + 1) * cell_w);
        for (int64_t x = 0; x < out_w; ++x) cols[x] = rise_tap(static_cast<double>(x) + dx, grid, cell_w);
        float* mask = dst + j * out_h * out_w;
        for (int64_t y = 0; y < out_h; ++y) {
          const RiseTap r = rise_tap(static_cast<double>(y) + dy, grid, cell_h);
          const double* top = g.data() + r.lo * grid;
          const double* bottom = g.data() + r.hi * grid;
          for (int64_t x = 0; x < out_w; ++x) {
            const RiseTap& c = cols[x];
            const double t = top[c.lo] * c.w_lo + top[c.hi] * c.w_hi;
            const double b = bottom[c.lo] * c.w_lo + bottom[c.hi] * c.w_hi;
            mask[y * out_w + x] = static_cast<float>(t * r.w_lo + b * r.w_hi);
          }
        }
      }
    }
  }
  return out;
}

// Keep masks [count, C, H, W] of Captum's occlusion windows first..first+count-1 (row-major
// over `positions`, width fastest), each at index * stride and cropped at the edge.
Array occlusion_masks(std::array<int64_t, 3> shape, std::array<int64_t, 3> window,
                      std::array<int64_t, 3> stride, std::array<int64_t, 3> positions, int64_t first,
                      int64_t count) {
  require(first >= 0 && count >= 0 && first + count <= positions[0] * positions[1] * positions[2],
          "window range out of bounds");
  const int64_t C = shape[0], H = shape[1], W = shape[2], plane = H * W;
  Array out({count, C, H, W});
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (count * C * plane >= kStreamingGrain)
    for (int64_t j = 0; j < count; ++j) {
      int64_t rest = first + j;
      const int64_t ix = rest % positions[2];
      rest /= positions[2];
      const int64_t iy = rest % positions[1];
      const int64_t ic = rest / positions[1];
      const int64_t c0 = ic * stride[0], y0 = iy * stride[1], x0 = ix * stride[2];
      float* mask = dst + j * C * plane;
      std::fill(mask, mask + C * plane, 1.f);
      for (int64_t c = c0; c < std::min(c0 + window[0], C); ++c)
        for (int64_t y = y0; y < std::min(y0 + window[1], H); ++y)
          std::fill(mask + c * plane + y * W + x0, mask + c * plane + y * W + std::min(x0 + window[2], W), 0.f);
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
  m.def("apply_masks", &apply_masks, py::arg("image"), py::arg("masks"), py::arg("baseline"),
        "image * m + baseline * (1 - m) per mask.");
  m.def("segment_masks", &segment_masks, py::arg("segments"), py::arg("on_off"),
        "Per-pixel value of the pixel's segment in each on/off sample.");
  m.def("accumulate_scores", &accumulate_scores, py::arg("scores"), py::arg("masks"),
        "sum_b scores[b, t] * masks[b] with float64 accumulation.");
  m.def("rise_masks", &rise_masks, py::arg("seed"), py::arg("first"), py::arg("count"),
        py::arg("grid"), py::arg("p"), py::arg("out_h"), py::arg("out_w"),
        "Counter-based RISE masks (SplitMix64), bilinear upsampled, shifted and cropped.");
  m.def("occlusion_masks", &occlusion_masks, py::arg("shape"), py::arg("window"), py::arg("stride"),
        py::arg("positions"), py::arg("first"), py::arg("count"),
        "Keep masks of Captum's occlusion windows.");
}
