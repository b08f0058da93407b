"""Past 2^31 elements (70B-class layers are real): index arithmetic is 64-bit everywhere.

- quantize + dequantize a tensor of 2^31 + 2^16 + 1 elements on the CPU; codes, scales and values on
  both sides of index 2^31 (and at the ragged end) equal the reference on the same pattern;
- the fused linear with N x K > 2^31 (forward on the GEMV and GEMM paths, with LoRA, and dx = dy W):
  output rows on both sides of weight element 2^31 equal float64 math on the dequantized rows;
- the same index arithmetic everywhere, with no memory: the CUDA kernels' stage-copy and scale maps
  and the shared layout sizes compiled for the host (tests/cpp/index_math.cpp) against Python's
  unbounded integers, and the ops' shape logic on meta tensors.

The two real runs need ~5.5 GiB and ~1.5 GiB of free memory and skip with less."""
import math
import os
import shutil
import subprocess

import pytest
import torch

import nf4lora as nl
from nf4lora.backends import default as ref_be
from numerics import rel_err

ops = torch.ops.nf4lora
TWO31 = 2**31
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _need_memory(gib):
    have = _mem_available_gib()
    if have < gib:
        pytest.skip(f"needs {gib} GiB of free memory, {have:.1f} GiB available")


# ----------------------------------------------------------------------------- quantize / dequantize
@pytest.mark.slow
def test_quantize_dequantize_past_2_31_elements():
    _need_memory(6.0)
    P, bs = 1 << 16, 4096  # pattern period (a whole number of blocks); largest blocksize
    n = TWO31 + P + 1  # odd: the last byte is half padding, the last block partial (1 element)
    g = torch.Generator().manual_seed(0)
    pattern = (torch.randn(P, generator=g) * torch.rand(P // bs, generator=g).repeat_interleave(bs) * 4)
    pattern = pattern.to(torch.bfloat16)
    w = torch.empty(n, dtype=torch.bfloat16)
    reps = n // P
    w[: reps * P].view(reps, P).copy_(pattern)  # no second full-size buffer
    w[reps * P:] = pattern[: n - reps * P]
    q = nl.quantize_nf4(w, bs, double_quant=False)
    del w
    assert q.packed.numel() == (n + 1) // 2 and q.absmax.numel() == -(-n // bs)
    ref_packed, ref_absmax = ref_be.quantize_nf4(pattern, bs)  # the pattern's codes and scales
    bpp = P // 2  # packed bytes per period
    for start in (0, TWO31 // 2 - 4096, TWO31 // 2, (n + 1) // 2 - 4096):  # bytes around 2^31 elements
        s = start - start % bpp
        got = q.packed[s: s + bpp]
        assert torch.equal(got[: min(bpp, got.numel()) - 1], ref_packed[: min(bpp, got.numel()) - 1]), start
    # the ragged end: a 1-element last block (its own absmax) and a half-padding last byte (code 7)
    last_packed, last_absmax = ref_be.quantize_nf4(pattern[:1], bs)
    assert int(q.packed[-1]) == int(last_packed[0]) and int(q.packed[-1]) & 0xF == 7
    assert float(q.absmax[-1]) == float(last_absmax[0])
    blocks_pp = P // bs
    for b in (0, TWO31 // bs - 1, TWO31 // bs, q.absmax.numel() - 2):
        assert float(q.absmax[b]) == float(ref_absmax[b % blocks_pp]), b
    out = nl.dequantize_nf4(q)
    assert out.shape == (n,) and out.dtype == torch.bfloat16
    ref = ref_be.dequantize_nf4(ref_packed, ref_absmax, None, None, 0.0, bs, [P], torch.bfloat16)
    for i in (0, TWO31 - 3 * P // 2, TWO31 - P, TWO31, TWO31 + P - 5):  # windows across index 2^31
        s = i - i % P
        assert torch.equal(out[s: s + P], ref[: out[s: s + P].numel()]), i
    assert torch.equal(out[TWO31 - 8: TWO31 + 8], torch.cat([ref[-8:], ref[:8]]))  # 2^31 = 0 mod P
    assert torch.equal(out[-1:], pattern[:1])  # +-1.0 code times its own absmax: the value itself
    # double quantization of the same 2^19 + 17 block scales: codes past 2^31 / blocksize decode back
    qa, a2 = ops.quantize_absmax(q.absmax, float(q.absmax.mean()), q.code8 if q.code8 is not None
                                 else nl.nf4_format.DYNAMIC_SIGNED)
    back = ops.dequantize_absmax(qa, a2, nl.nf4_format.DYNAMIC_SIGNED, float(q.absmax.mean()))
    assert rel_err(back, q.absmax) < 1e-2


# ----------------------------------------------------------------------------- the fused linear
N_BIG, K_BIG, BS_BIG = (1 << 17) + 8, 1 << 14, 64  # N x K = 2^31 + 2^17: rows >= 2^17 lie past 2^31


def _rows(q, n0, n1):
    """Rows [n0, n1) of the NF4 weight as float64, dequantized from slices of its state (K is a
    multiple of 256 blocks, so the slices are whole nested groups)."""
    K, bs = q.shape[1], q.blocksize
    b0, b1 = n0 * K // bs, n1 * K // bs
    part = nl.NF4Tensor(q.packed[n0 * K // 2: n1 * K // 2], q.absmax[b0:b1], (n1 - n0, K), torch.float32,
                        bs, q.absmax2[b0 // 256: -(-b1 // 256)], q.code8, q.offset)
    return nl.dequantize_nf4(part, torch.float64)


@pytest.fixture(scope="module")
def big_weight():
    _need_memory(2.0)
    g = torch.Generator().manual_seed(1)
    n = N_BIG * K_BIG
    nb = n // BS_BIG
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=g)  # every code pattern
    qabsmax = torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g)
    absmax2 = torch.rand(-(-nb // 256), generator=g) * 0.1 + 0.01
    q = nl.NF4Tensor(packed, qabsmax, (N_BIG, K_BIG), torch.float32, BS_BIG, absmax2,
                     nl.nf4_format.DYNAMIC_SIGNED.clone(), 0.05)
    return q


BOUNDARY = TWO31 // K_BIG  # the first row whose elements have flat index >= 2^31


TOL_BIG = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: the tile path's rounding of W and y


@pytest.mark.slow
@pytest.mark.parametrize("M,dtype", [(1, torch.float32), (3, torch.float32), (24, torch.float32),
                                     (24, torch.bfloat16)])  # GEMV (M <= 16), GEMM, bf16 tile paths
def test_fused_linear_forward_past_2_31(big_weight, M, dtype):
    q = big_weight
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K_BIG, generator=g).to(dtype)
    r = 4
    A, B = torch.randn(r, K_BIG, generator=g) * 0.01, torch.randn(N_BIG, r, generator=g) * 0.1
    y = nl.qlora_linear(x, q, A, B, 0.5)
    assert y.shape == (M, N_BIG)
    for n0, n1 in ((0, 8), (BOUNDARY - 8, BOUNDARY + 8), (N_BIG - 8, N_BIG)):
        W = _rows(q, n0, n1)
        want = x.double() @ W.T + 0.5 * (x.double() @ A.double().T) @ B[n0:n1].double().T
        assert rel_err(y[:, n0:n1], want) < TOL_BIG[dtype], (n0, n1)
    y0 = nl.nf4_linear(x[:2], q)
    W = _rows(q, BOUNDARY - 2, BOUNDARY + 2)
    assert rel_err(y0[:, BOUNDARY - 2: BOUNDARY + 2], x[:2].double() @ W.T) < TOL_BIG[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("M,dtype", [(2, torch.float32), (24, torch.float32), (24, torch.bfloat16)])
def test_fused_linear_dx_past_2_31(big_weight, M, dtype):
    """dx = dy W with dy non-zero only on rows across the 2^31 boundary and the last rows."""
    q = big_weight
    g = torch.Generator().manual_seed(10 + M)
    dy = torch.zeros(M, N_BIG, dtype=dtype)
    spans = ((BOUNDARY - 4, BOUNDARY + 4), (N_BIG - 3, N_BIG))
    for n0, n1 in spans:
        dy[:, n0:n1] = torch.randn(M, n1 - n0, generator=g).to(dtype)
    dx = ops.nf4_linear_t(dy, q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize, K_BIG)
    want = sum(dy[:, n0:n1].double() @ _rows(q, n0, n1) for n0, n1 in spans)
    assert rel_err(dx, want) < TOL_BIG[dtype]


# ----------------------------------------------------------------------------- index math, no memory
K_AS, W_STRIDE_FWD, CHUNK, BK = 64 + 16, 64 // 2 + 16, 32, 64  # csrc/cuda/nf4_frag.h constants


def _queries():
    """(query line, expected answer) pairs around flat indices 2^31 and 2^32 for 70B-class shapes."""
    out = []
    for N, K, bs in ((N_BIG, K_BIG, 64), (8192 * 9, 28672, 64), (28672, 8192 * 9, 4096), ((1 << 20) + 3, 4096, 128)):
        for flat in (TWO31, 2**32, N * K - 1):
            row = min(flat // K, N - 1)
            for bn in (64, 128, 256):
                for c0 in (row - row % bn, max(0, row - row % bn - bn)):
                    for r0 in (0, (K // 2) - (K // 2) % BK, K - BK):
                        for i in (0, 1, 7, bn - 1, 2 * bn - 1):
                            # forward W copy / scale slot
                            n, k = c0 + (i >> 1), r0 + (i & 1) * CHUNK
                            valid = n < N and k < K
                            out.append((f"w 0 {i} {bn} {c0} {r0} {K} {N} {K}",
                                        f"{(n * K + k) // 2} {(i >> 1) * W_STRIDE_FWD + (i & 1) * 16} {int(valid)}"))
                            out.append((f"s 0 {i} {bn} {c0} {r0} {K} {N} {K} {bs}",
                                        f"{(n * K + k) // bs if valid else -1}"))
                            # backward: reduction rows r0' near the boundary row, columns c0' along K
                            per = bn // CHUNK
                            rr0 = c0
                            cc0 = r0 - r0 % bn
                            n, k = rr0 + i // per, cc0 + (i % per) * CHUNK
                            valid = n < N and k < K
                            out.append((f"w 1 {i} {bn} {cc0} {rr0} {N} {N} {K}",
                                        f"{(n * K + k) // 2} {(i // per) * (bn // 2 + 16) + (i % per) * 16} {int(valid)}"))
                            out.append((f"s 1 {i} {bn} {cc0} {rr0} {N} {N} {K} {bs}",
                                        f"{(n * K + k) // bs if valid else -1}"))
                        # activations [M, red] with M * red > 2^31
                        M = N
                        for i in (0, 9, 8 * 64 - 1):
                            m, k = c0 + i // 8, r0 + (i % 8) * 8
                            out.append((f"a {i} {c0} {r0} {M} {K} {K}",
                                        f"{m * K + k} {((i // 8) * K_AS + (i % 8) * 8) * 2} {int(m < M and k < K)}"))
        for n in (TWO31 - 1, TWO31, TWO31 + 1, N * K, 2**40 + 7, 2**62 + 1):
            nb = -(-n // bs)
            out.append((f"l {n} {bs}", f"{(n + 1) // 2} {nb} {-(-nb // 256)}"))
    return out


def test_cuda_index_math_past_2_31_on_host(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path / "index_math")
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(REPO, "csrc", "include"), "-I",
                    os.path.join(REPO, "csrc"), os.path.join(HERE, "cpp", "index_math.cpp"), "-o", exe],
                   check=True, capture_output=True, timeout=300)
    qs = _queries()
    # not vacuous: hundreds of answers are element indices / byte offsets / block counts past 2^31
    assert sum(int(a.split()[0]) > TWO31 for _, a in qs) > 300
    res = subprocess.run([exe], input="\n".join(q for q, _ in qs) + "\n", capture_output=True, text=True,
                         timeout=120, check=True)
    got = res.stdout.strip().split("\n")
    assert len(got) == len(qs)
    bad = [(q, a, g) for (q, a), g in zip(qs, got) if a != g]
    assert not bad, f"{len(bad)} wrong answers, first: {bad[:3]}"


def test_op_shapes_past_2_31_on_meta():
    """The ops' fake kernels and the state checks take sizes past 2^31 (and 2^40) exactly."""
    for shape, bs in (((1 << 20, (1 << 11) + 1), 64), (((1 << 31) + 1,), 4096), ((1 << 20, 1 << 20), 64)):
        n = math.prod(shape)
        w = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        packed, absmax = ops.quantize_nf4(w, bs)
        assert packed.numel() == (n + 1) // 2 and absmax.numel() == -(-n // bs)
        q = nl.NF4Tensor(packed, absmax, shape, torch.bfloat16, bs)  # every length checked
        out = nl.dequantize_nf4(q)
        assert out.shape == shape and out.device.type == "meta"
        with pytest.raises(ValueError, match="packed"):
            nl.NF4Tensor(packed[:-1], absmax, shape, torch.bfloat16, bs)
    N, K = 1 << 20, 1 << 14  # 2^34 weights
    q = nl.NF4Tensor(torch.empty(N * K // 2, dtype=torch.uint8, device="meta"),
                     torch.empty(N * K // 64, device="meta"), (N, K), torch.float32, 64)
    x = torch.empty(5, K, device="meta")
    assert nl.nf4_linear(x, q).shape == (5, N)
