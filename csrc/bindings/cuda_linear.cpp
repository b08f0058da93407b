// Bindings of the CUDA NF4 linear launchers (csrc/cuda/linear.h) and of their host-side logic:
// the dispatcher (plan_linear on any SM count / architecture), the per-thread helpers of
// nf4_frag.h, and a CPU emulation of the tensor-core GEMM that runs every warp lane by lane
// through the same functions the kernel calls (tests/test_cuda_host.py checks it against a
// reference GEMM). Only the launcher entry points need a GPU.
#include <pybind11/stl.h>

#include <cstring>
#include <vector>

#include "bindings/common.h"
#include "bindings/cuda_bindings.h"
#include "cuda/launch.h"
#include "cuda/linear.h"

namespace nf4lora {

using namespace bind;

namespace {

py::dict plan_dict(const cuda::LinearPlan& p) {
  py::dict d;
  static const char* names[] = {"simt", "gemv", "gemm"};
  d["ok"] = p.ok;
  d["path"] = names[static_cast<int>(p.path)];
  d["cfg"] = p.cfg;
  d["gemv_mt"] = p.gemv_mt;
  d["splits"] = p.splits;
  d["split_len"] = p.split_len;
  d["grid"] = py::make_tuple(p.grid_x, p.grid_y, p.grid_z);
  d["threads"] = p.threads;
  d["smem_bytes"] = p.smem_bytes;
  d["ws_floats"] = p.ws_floats;
  return d;
}

// The epilogue of the host checks, from their (left, right) view: forward U and lora_B, backward
// G and lora_A (left == 0: no LoRA term).
LinearEpilogue host_epilogue(bool bwd, uintptr_t bias, uintptr_t left, uintptr_t right, int64_t r,
                             float scaling, double dropout_p, int64_t seed) {
  if (left == 0) r = 0;
  if (bwd) return make_epilogue(bias, right, 0, r, scaling, dropout_p, seed, 0, left);
  return make_epilogue(bias, 0, right, r, scaling, dropout_p, seed, left, 0);
}

// ---------------------------------------------------------------- CPU emulation of the GEMM
// One stage at a time (the pipeline only reorders when copies land); every copy, scale slot,
// fragment and accumulator coordinate comes from nf4_frag.h, as in gemm_nf4.cu.
template <DType D, int MF, int NF, int WM, int WN>
void emulate_gemm_t(bool bwd, const uint8_t* act, int64_t M, const cuda::NF4Weight& w,
                    const LinearEpilogue& epi, float* out) {
  using namespace cuda;
  using Tile = GemmTile<MF, NF, WM, WN, 1>;
  constexpr int BM = Tile::BM, BN = Tile::BN, kWarps = Tile::kWarps;
  const int64_t red = bwd ? w.N : w.K, ncols = bwd ? w.K : w.N;
  const int w_stride = bwd ? BN / 2 + 16 : kWStrideFwd;
  const int s_per_row = bwd ? BN / kChunk : kGemmBK / kChunk;
  std::vector<uint8_t> stage(Tile::kStageBytes);
  uint8_t* at = stage.data();
  uint8_t* wt = at + Tile::kABytes;
  float* st = reinterpret_cast<float*>(wt + Tile::kWBytes);
  const int64_t packed_bytes_total = (w.N * w.K + 1) / 2;
  static const uint8_t zeros[16] = {};
  std::vector<float> acc(static_cast<size_t>(kWarps) * 32 * MF * NF * 4);
  auto A = [&](int warp, int lane, int i, int f) { return &acc[((((warp * 32) + lane) * MF + i) * NF + f) * 4]; };
  for (int64_t m0 = 0; m0 < M; m0 += BM)
    for (int64_t c0 = 0; c0 < ncols; c0 += BN) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r0 = 0; r0 < red; r0 += kGemmBK) {
        std::fill(stage.begin(), stage.end(), 0xAB);  // poison: every byte read must be copied
        for (int i = 0; i < Tile::kACopies; ++i) {
          const CopyOp op = a_copy_op(i, m0, r0, M, red, red);
          std::memcpy(at + op.dst, op.valid ? act + op.src * 2 : zeros, 16);
        }
        for (int i = 0; i < Tile::kWCopies; ++i) {
          const CopyOp op = w_copy_op(bwd, i, BN, c0, r0, red, w.N, w.K);
          if (op.valid && op.src + 16 > packed_bytes_total)
            throw std::runtime_error("emulate_gemm: W copy past the end of packed");
          std::memcpy(wt + op.dst, op.valid ? w.packed + op.src : zeros, 16);
        }
        for (int i = 0; i < Tile::kScales; ++i) {
          const int64_t b = scale_block_op(bwd, i, BN, c0, r0, red, w.N, w.K, w.blocksize);
          st[i] = b >= 0 ? w.scales.block(b) : 0.0f;
        }
        for (int warp = 0; warp < kWarps; ++warp) {
          const int wm0 = (warp / WN) * 16 * MF, wn0 = (warp % WN) * 8 * NF;
          for (int s = 0; s < kGemmBK / 16; ++s) {
            uint32_t bf[32][NF][2];
            for (int lane = 0; lane < 32; ++lane) {
              const float tbl = nf4_table_reg(lane);
              if (bwd) {
                frag_b_bwd<D, NF>(wt, w_stride, st, s_per_row, wn0, s, lane, tbl, bf[lane]);
              } else {
                for (int f = 0; f < NF; ++f)
                  frag_b_fwd<D>(wt, st, wn0 + 8 * f, s, lane, tbl, bf[lane][f]);
              }
            }
            for (int i = 0; i < MF; ++i) {
              uint32_t af[32][4];
              for (int lane = 0; lane < 32; ++lane) frag_a(at, wm0 + 16 * i, s, lane, af[lane]);
              for (int f = 0; f < NF; ++f) {
                uint32_t bl[32][2];
                float c[32][4];
                for (int lane = 0; lane < 32; ++lane) {
                  bl[lane][0] = bf[lane][f][0];
                  bl[lane][1] = bf[lane][f][1];
                  std::memcpy(c[lane], A(warp, lane, i, f), 16);
                }
                mma_host<D>(af, bl, c);
                for (int lane = 0; lane < 32; ++lane) std::memcpy(A(warp, lane, i, f), c[lane], 16);
              }
            }
          }
        }
      }
      // epilogue (LoRA with the tensor-core fragments, mask, bias) -> float32 out
      for (int warp = 0; warp < kWarps; ++warp) {
        const int wm0 = (warp / WN) * 16 * MF, wn0 = (warp % WN) * 8 * NF;
        if (epi.has_lora(bwd)) {
          for (int64_t j0 = 0; j0 < epi.r; j0 += 16)
            for (int i = 0; i < MF; ++i) {
              uint32_t la[32][4];
              for (int lane = 0; lane < 32; ++lane)
                frag_lora_a<D>(epi.left(bwd), epi.r, M, epi.scaling, m0 + wm0 + 16 * i, j0, lane, la[lane]);
              for (int f = 0; f < NF; ++f) {
                uint32_t lb[32][2];
                float tmp[32][4] = {};
                for (int lane = 0; lane < 32; ++lane) {
                  const int64_t col = c0 + wn0 + (bwd ? bwd_col(f, lane >> 2, NF) : 8 * f + (lane >> 2));
                  frag_lora_b<D>(bwd, epi.right(bwd), epi.r, ncols, col, j0, lane, lb[lane]);
                }
                mma_host<D>(la, lb, tmp);
                for (int lane = 0; lane < 32; ++lane)
                  for (int e = 0; e < 4; ++e) {
                    float v = tmp[lane][e];
                    const RowCol rc = acc_coord(bwd, NF, wm0, wn0, i, f, lane, e);
                    if (bwd && epi.drop.active())
                      v = epi.drop.apply(epi.drop.row(m0 + rc.row), c0 + rc.col, v);
                    A(warp, lane, i, f)[e] += v;
                  }
              }
            }
        }
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < MF; ++i)
            for (int f = 0; f < NF; ++f)
              for (int e = 0; e < 4; ++e) {
                const RowCol rc = acc_coord(bwd, NF, wm0, wn0, i, f, lane, e);
                const int64_t m = m0 + rc.row, c = c0 + rc.col;
                if (m >= M || c >= ncols) continue;
                float v = A(warp, lane, i, f)[e];
                if (!bwd && epi.bias != nullptr) v += epi.bias[c];
                out[m * ncols + c] = v;
              }
      }
    }
}

template <DType D>
void emulate_gemm_d(int cfg, bool bwd, const uint8_t* act, int64_t M, const cuda::NF4Weight& w,
                    const LinearEpilogue& epi, float* out) {
  using cuda::kGemmCfgs;
  static_assert(cuda::kNumGemmCfgs == 3, "emulate every kGemmCfgs row");
  switch (cfg) {
    case 0: return emulate_gemm_t<D, kGemmCfgs[0].mfrags, kGemmCfgs[0].nfrags, kGemmCfgs[0].warps_m, kGemmCfgs[0].warps_n>(bwd, act, M, w, epi, out);
    case 1: return emulate_gemm_t<D, kGemmCfgs[1].mfrags, kGemmCfgs[1].nfrags, kGemmCfgs[1].warps_m, kGemmCfgs[1].warps_n>(bwd, act, M, w, epi, out);
    case 2: return emulate_gemm_t<D, kGemmCfgs[2].mfrags, kGemmCfgs[2].nfrags, kGemmCfgs[2].warps_m, kGemmCfgs[2].warps_n>(bwd, act, M, w, epi, out);
    default: throw py::value_error("cfg out of range");
  }
}

}  // namespace

void register_cuda_linear(py::module_& m) {
  // ------------------------------------------------------------ launchers (device pointers)
  // The launch convention of nf4lora/epilogue.h, with _C.qlora_forward / qlora_backward_dx's
  // arguments plus the workspace (linear_workspace_floats elements), the stream and a forced path.
  m.def(
      "qlora_forward",
      [](uintptr_t x, int dtype, int64_t M, uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
         uintptr_t absmax2, uintptr_t code8, float offset, int64_t blocksize, int64_t N, int64_t K,
         uintptr_t bias, uintptr_t A, uintptr_t B, int64_t r, float scaling, double dropout_p,
         int64_t seed, uintptr_t y, uintptr_t u, uintptr_t ws, int64_t ws_floats, uintptr_t stream,
         int force_path) {
        const auto w = make_weight(packed, absmax, qabsmax, absmax2, code8, offset, blocksize, N, K);
        const LinearEpilogue e = make_epilogue(bias, A, B, r, scaling, dropout_p, seed, u, 0);
        py::gil_scoped_release nogil;
        check_cuda(cuda::qlora_forward(ptr<const void>(x), to_dtype(dtype), M, w, e, ptr<void>(y),
                                       ptr<float>(ws), ws_floats, cuda::as_stream(stream),
                                       force_path),
                   "qlora_forward");
      },
      py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("packed"), py::arg("absmax"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
      py::arg("blocksize"), py::arg("N"), py::arg("K"), py::arg("bias"), py::arg("A"), py::arg("B"),
      py::arg("r"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("y"),
      py::arg("u"), py::arg("ws"), py::arg("ws_floats"), py::arg("stream"),
      py::arg("force_path") = -1);
  m.def(
      "qlora_backward_dx",
      [](uintptr_t dy, int dtype, int64_t M, uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
         uintptr_t absmax2, uintptr_t code8, float offset, int64_t blocksize, int64_t N, int64_t K,
         uintptr_t A, int64_t r, float scaling, double dropout_p, int64_t seed, uintptr_t g,
         uintptr_t dx, uintptr_t ws, int64_t ws_floats, uintptr_t stream, int force_path) {
        const auto w = make_weight(packed, absmax, qabsmax, absmax2, code8, offset, blocksize, N, K);
        const LinearEpilogue e = make_epilogue(0, A, 0, r, scaling, dropout_p, seed, 0, g);
        py::gil_scoped_release nogil;
        check_cuda(cuda::qlora_backward_dx(ptr<const void>(dy), to_dtype(dtype), M, w, e,
                                           ptr<void>(dx), ptr<float>(ws), ws_floats,
                                           cuda::as_stream(stream), force_path),
                   "qlora_backward_dx");
      },
      py::arg("dy"), py::arg("dtype"), py::arg("M"), py::arg("packed"), py::arg("absmax"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code8"), py::arg("offset"),
      py::arg("blocksize"), py::arg("N"), py::arg("K"), py::arg("A"), py::arg("r"),
      py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("g"), py::arg("dx"),
      py::arg("ws"), py::arg("ws_floats"), py::arg("stream"), py::arg("force_path") = -1);
  m.def(
      "linear_workspace_floats",
      [](int64_t M, int64_t N, int64_t K, bool bwd, int dtype, bool aligned, int force,
         int sm_count, int cc) {
        if (sm_count <= 0)  // the current device (else a given one: no GPU needed)
          check_cuda(cuda::device_info(&sm_count, &cc), "linear_workspace_floats");
        return cuda::linear_workspace_floats(M, N, K, bwd, to_dtype(dtype), aligned, sm_count, cc,
                                             force);
      },
      "float32 elements of the workspace qlora_forward (bwd=False) / qlora_backward_dx (bwd=True) "
      "need (linear_plan.h linear_workspace_floats) on the current device, or with sm_count > 0 "
      "on a device of that many SMs and compute capability cc",
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("bwd"), py::arg("dtype"),
      py::arg("aligned") = true, py::arg("force") = -1, py::arg("sm_count") = 0, py::arg("cc") = 0);
  m.def("lora_grad_a_ws_floats", &cuda::lora_grad_a_ws_floats, py::arg("M"), py::arg("K"),
        py::arg("r"));
  m.def(
      "lora_grad_a",
      [](uintptr_t g, uintptr_t x, int dtype, int64_t M, int64_t K, int64_t r, float scaling,
         double dropout_p, int64_t seed, uintptr_t da, uintptr_t ws, uintptr_t stream) {
        const DropoutMask mask = make_mask(dropout_p, seed);
        py::gil_scoped_release nogil;
        check_cuda(cuda::lora_grad_a(ptr<const float>(g), ptr<const void>(x), to_dtype(dtype), M, K,
                                     r, scaling, mask, ptr<float>(da), ptr<float>(ws),
                                     cuda::as_stream(stream)),
                   "lora_grad_a");
      },
      py::arg("g"), py::arg("x"), py::arg("dtype"), py::arg("M"), py::arg("K"), py::arg("r"),
      py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("da"), py::arg("ws"),
      py::arg("stream"));
  m.def(
      "linear_plan",
      [](int64_t M, int64_t N, int64_t K, bool bwd, int dtype, bool aligned, int force) {
        cuda::LinearPlan p;
        check_cuda(cuda::linear_plan_current(M, N, K, bwd, to_dtype(dtype), aligned, &p, force),
                   "linear_plan");
        return plan_dict(p);
      },
      "The plan the launchers use on the current device", py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("bwd"), py::arg("dtype"), py::arg("aligned") = true, py::arg("force") = -1);

  // ------------------------------------------------------------ host-side logic (no GPU)
  m.def(
      "plan_linear_host",
      [](int64_t M, int64_t N, int64_t K, bool bwd, int dtype, bool aligned, int sm_count, int cc,
         int force) {
        if (M <= 0 || N <= 0 || K <= 0) throw py::value_error("M, N, K must be positive");
        if (force < -1 || force > 2) throw py::value_error("force must be -1, 0, 1 or 2");
        return plan_dict(
            cuda::plan_linear(M, N, K, bwd, to_dtype(dtype), aligned, sm_count, cc, force));
      },
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("bwd"), py::arg("dtype"),
      py::arg("aligned") = true, py::arg("sm_count") = 132, py::arg("cc") = 90,
      py::arg("force") = -1);
  m.def("gemm_cfgs", [] {
    py::list out;
    for (int i = 0; i < cuda::kNumGemmCfgs; ++i) {
      const cuda::GemmCfg c = cuda::kGemmCfgs[i];
      py::dict d;
      d["mfrags"] = c.mfrags;
      d["nfrags"] = c.nfrags;
      d["warps_m"] = c.warps_m;
      d["warps_n"] = c.warps_n;
      d["stages"] = c.stages;
      d["bm"] = cuda::gemm_bm(i);
      d["bn"] = cuda::gemm_bn(i);
      d["threads"] = cuda::gemm_threads(i);
      d["smem_bytes"] = cuda::gemm_smem(i);
      out.append(d);
    }
    return out;
  });
  m.def("dispatch_table", [] {
    py::list out;
    static const char* names[] = {"simt", "gemv", "gemm"};
    for (const auto& d : cuda::kDispatch)
      out.append(py::make_tuple(d.max_m, names[static_cast<int>(d.path)], d.gemm_cfg));
    return out;
  });
  m.def("host_decode8", [](uint32_t word) {
    float v[8];
    cuda::nf4_decode8(word, 0.0f, v);
    return std::vector<float>(v, v + 8);
  });
  m.def("host_kperm", [](int slot) { return cuda::kperm(slot); });
  m.def("host_bwd_col", [](int frag, int c, int nf) { return cuda::bwd_col(frag, c, nf); });
  m.def("host_pack2", [](int dtype, float lo, float hi) {
    const DType d = to_dtype(dtype);
    if (d == DType::kBF16) return cuda::pack2<DType::kBF16>(lo, hi);
    if (d == DType::kF16) return cuda::pack2<DType::kF16>(lo, hi);
    throw py::value_error("pack2: dtype must be f16 or bf16");
  });
  m.def("host_mma_coords", [](int lane) {
    py::list a, b, c;
    for (int reg = 0; reg < 4; ++reg)
      for (int h = 0; h < 2; ++h) {
        const auto rc = cuda::mma_a_coord(lane, reg, h);
        a.append(py::make_tuple(rc.row, rc.col));
      }
    for (int reg = 0; reg < 2; ++reg)
      for (int h = 0; h < 2; ++h) {
        const auto rc = cuda::mma_b_coord(lane, reg, h);
        b.append(py::make_tuple(rc.row, rc.col));
      }
    for (int reg = 0; reg < 4; ++reg) {
      const auto rc = cuda::mma_c_coord(lane, reg);
      c.append(py::make_tuple(rc.row, rc.col));
    }
    return py::make_tuple(a, b, c);
  });
  m.def(
      "host_epilogue_value",
      [](bool bwd, int64_t m, int64_t c, int64_t ncols, float acc, uintptr_t bias, uintptr_t left,
         uintptr_t right, int64_t r, float scaling, double dropout_p, int64_t seed) {
        const LinearEpilogue e = host_epilogue(bwd, bias, left, right, r, scaling, dropout_p, seed);
        return cuda::epilogue_value(e, bwd, m, c, ncols, acc);
      },
      "Epilogue of one element on host pointers (CPU tensors)");
  m.def(
      "emulate_gemm",
      [](int cfg, bool bwd, int dtype, uintptr_t act, int64_t M, uintptr_t packed,
         uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code8, float offset,
         int64_t blocksize, int64_t N, int64_t K, uintptr_t bias, uintptr_t left, uintptr_t right,
         int64_t r, float scaling, double dropout_p, int64_t seed, uintptr_t out) {
        const DType d = to_dtype(dtype);
        if (d == DType::kF32) throw py::value_error("the tensor-core path takes f16/bf16");
        if (K % 32 != 0 || (bwd && N % 8 != 0))
          throw py::value_error("the tensor-core path needs K % 32 == 0 (and N % 8 == 0 backward)");
        const auto w = make_weight(packed, absmax, qabsmax, absmax2, code8, offset, blocksize, N, K);
        const LinearEpilogue e = host_epilogue(bwd, bias, left, right, r, scaling, dropout_p, seed);
        const uint8_t* a = ptr<const uint8_t>(act);
        if (d == DType::kBF16)
          emulate_gemm_d<DType::kBF16>(cfg, bwd, a, M, w, e, ptr<float>(out));
        else
          emulate_gemm_d<DType::kF16>(cfg, bwd, a, M, w, e, ptr<float>(out));
      },
      "CPU emulation of gemm_nf4_kernel (one split) on host pointers; float32 out [M, ncols]",
      py::arg("cfg"), py::arg("bwd"), py::arg("dtype"), py::arg("act"), py::arg("M"),
      py::arg("packed"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code8"), py::arg("offset"), py::arg("blocksize"), py::arg("N"), py::arg("K"),
      py::arg("bias"), py::arg("left"), py::arg("right"), py::arg("r"), py::arg("scaling"),
      py::arg("dropout_p"), py::arg("seed"), py::arg("out"));
}

}  // namespace nf4lora
