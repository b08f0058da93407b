"""Host-side logic of the CUDA NF4 linear, tested on the CPU (no GPU needed; needs the built
nf4lora._C_cuda module): the dispatcher and its grids, the per-thread helpers of
csrc/cuda/nf4_frag.h (NF4 decode, 16-bit packing, mma.m16n8k16 fragment maps, the reduction and
column permutations), the epilogue, and a lane-by-lane CPU emulation of the tensor-core GEMM that
runs the kernel's own fragment functions and is checked against an fp64 reference GEMM."""
import pytest
import torch

import nf4lora as nl
from nf4lora.backends import default
from nf4lora.nf4_format import NF4_CODE

_C_cuda = pytest.importorskip("nf4lora._C_cuda")
if not hasattr(_C_cuda, "plan_linear_host"):
    pytest.skip("nf4lora._C_cuda built without the linear kernels", allow_module_level=True)

F32, F16, BF16 = 0, 1, 2
TORCH_DT = {F16: torch.float16, BF16: torch.bfloat16}
H200_SMS, H200_CC = 132, 90
A100_SMS, A100_CC = 108, 80
MAX_SMEM_SM80 = 163 * 1024  # opt-in dynamic shared memory per block on sm_80 (sm_90: 227 KB)


# ------------------------------------------------------------------------------ dispatcher
def plan(M, N, K, bwd=False, dtype=BF16, aligned=True, sms=H200_SMS, cc=H200_CC, force=-1):
    return _C_cuda.plan_linear_host(M, N, K, bwd, dtype, aligned, sms, cc, force)


def test_dispatch_table_is_ordered_and_ends_unbounded():
    table = _C_cuda.dispatch_table()
    bounds = [row[0] for row in table]
    assert bounds == sorted(bounds) and bounds[-1] >= 2**62
    ncfg = len(_C_cuda.gemm_cfgs())
    assert all(0 <= row[2] < ncfg for row in table)


@pytest.mark.parametrize("M,path,cfg", [(1, "gemv", None), (2, "gemv", None), (3, "gemm", 0),
                                        (16, "gemm", 0), (17, "gemm", 1), (96, "gemm", 1),
                                        (97, "gemm", 2), (4097, "gemm", 2)])
def test_dispatch_by_m(M, path, cfg):
    p = plan(M, 4096, 4096)
    assert p["ok"] and p["path"] == path
    if cfg is not None:
        assert p["cfg"] == cfg


@pytest.mark.parametrize("M", [1, 2, 3, 16, 17, 255, 4097])
def test_dispatch_rules(M):
    # backward never takes the GEMV
    assert plan(M, 4096, 4096, bwd=True)["path"] == "gemm"
    # fp32 activations: GEMV for M <= 2, otherwise the SIMT path (mma.sync takes 16-bit inputs)
    assert plan(M, 4096, 4096, dtype=F32)["path"] == ("gemv" if M <= 2 else "simt")
    # awkward K (not a multiple of 32: blocks straddle rows at odd nibbles) -> SIMT
    for K in (33, 1000, 4095):
        assert plan(M, 4096, K)["path"] == "simt"
        assert plan(M, 4096, K, bwd=True)["path"] == "simt"
    # backward reduction over N needs N % 8 == 0 for 16-byte dy loads
    assert plan(M, 4100, 4096, bwd=True)["path"] == "simt"
    assert plan(M, 4100, 4096, bwd=False)["path"] in ("gemv", "gemm")
    # unaligned pointers -> SIMT; pre-Ampere -> no mma.sync
    assert plan(M, 4096, 4096, aligned=False)["path"] == "simt"
    assert plan(M, 4096, 4096, cc=75)["path"] == ("gemv" if M <= 2 else "simt")


def test_forced_paths():
    assert plan(1, 256, 256, force=2)["ok"] and plan(1, 256, 256, force=2)["path"] == "gemm"
    assert plan(1, 256, 256, force=0)["path"] == "simt"
    assert not plan(3, 256, 256, force=1)["ok"]          # GEMV only for M <= 2
    assert not plan(1, 256, 256, bwd=True, force=1)["ok"]
    assert not plan(64, 256, 250, force=2)["ok"]         # K % 32
    assert not plan(64, 256, 256, dtype=F32, force=2)["ok"]
    with pytest.raises(ValueError):
        plan(1, 256, 256, force=3)
    with pytest.raises(ValueError):
        plan(0, 256, 256)


SHAPES = [(M, N, K) for M in (1, 2, 3, 16, 17, 255, 4097, 8192)
          for (N, K) in ((4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (96, 160),
                         (1000, 4064), (8, 32))]


@pytest.mark.parametrize("M", [1, 1024, 1025, 5000, 40000])
def test_lora_grad_a_workspace(M):
    """dA's M-split partials: ~1024 rows per split, at most 32 splits, no workspace for one."""
    K, r = 4096, 16
    s = min(32, -(-M // 1024))
    assert _C_cuda.lora_grad_a_ws_floats(M, K, r) == (s * r * K if s > 1 else 0)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bwd", [False, True])
@pytest.mark.parametrize("sms,cc", [(H200_SMS, H200_CC), (A100_SMS, A100_CC), (1, 80)])
def test_grid_covers_problem(M, N, K, bwd, sms, cc):
    p = plan(M, N, K, bwd=bwd, sms=sms, cc=cc)
    assert p["ok"]
    ncols, red = (K, N) if bwd else (N, K)
    gx, gy, gz = p["grid"]
    assert gx >= 1 and 1 <= gy <= 65535 and 1 <= gz <= 65535 and gx < 2**31
    s, sl = p["splits"], p["split_len"]
    assert 1 <= s <= 64
    assert s * sl >= red and (s - 1) * sl < red, "every split non-empty, all of the reduction covered"
    assert p["ws_floats"] == (s * M * ncols if s > 1 else 0)
    # the size Python allocates comes from the same pure function (linear_plan.h)
    assert _C_cuda.linear_workspace_floats(M, N, K, bwd, BF16, True, -1, sms, cc) == p["ws_floats"]
    if p["path"] == "gemv":
        assert M <= 2 and not bwd
        assert gx * 4 * 8 >= N and gy == s and sl % 1024 == 0
        assert p["threads"] == 128
    elif p["path"] == "gemm":
        cfg = _C_cuda.gemm_cfgs()[p["cfg"]]
        assert gx * cfg["bn"] >= ncols and (gx - 1) * cfg["bn"] < ncols
        assert gy * cfg["bm"] >= M and (gy - 1) * cfg["bm"] < M
        assert gz == s and sl % 64 == 0
        assert p["threads"] == cfg["threads"] and p["smem_bytes"] == cfg["smem_bytes"]
        if s > 1:
            assert sl >= 4 * 64, "a split is at least kMinKTilesPerSplit stages"
    else:
        assert gx * 64 >= ncols and gy * 64 >= M and s == 1


def test_split_k_fills_the_machine_for_small_problems():
    # M = 1 on 4096 x 4096: 128 row blocks alone do not fill 132 SMs x 4
    p = plan(1, 4096, 4096)
    assert p["path"] == "gemv" and p["grid"][0] * p["grid"][1] >= 132 * 2
    p = plan(16, 4096, 4096)
    assert p["path"] == "gemm" and p["grid"][0] * p["grid"][1] * p["grid"][2] >= 132
    # large problems need no split
    assert plan(8192, 4096, 4096)["splits"] == 1


def test_gemm_cfgs_fit_shared_memory_and_shapes():
    for c in _C_cuda.gemm_cfgs():
        assert c["smem_bytes"] <= MAX_SMEM_SM80
        assert c["bm"] == 16 * c["mfrags"] * c["warps_m"] and c["bn"] == 8 * c["nfrags"] * c["warps_n"]
        assert c["threads"] == 32 * c["warps_m"] * c["warps_n"] and c["nfrags"] in (4, 8)
        assert c["stages"] >= 2


# ------------------------------------------------------------------------ per-thread helpers
def test_decode8_matches_code_table():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64).tolist() + [0, 2**32 - 1]
    code = NF4_CODE.tolist()
    for w in words:
        b = w.to_bytes(4, "little")
        want = []
        for byte in b:  # element 2i in the high nibble
            want += [code[byte >> 4], code[byte & 15]]
        assert _C_cuda.host_decode8(w) == pytest.approx(want, abs=0, rel=0)


def test_pack2_rounds_like_torch():
    g = torch.Generator().manual_seed(1)
    vals = torch.cat([torch.randn(500, generator=g) * 10.0 ** torch.randint(-8, 6, (500,), generator=g),
                      torch.tensor([0.0, -0.0, 65504.0, 65520.0, 1e-8, 3.0e38, float("inf")])])
    for dt, code in ((torch.bfloat16, BF16), (torch.float16, F16)):
        bits = vals.to(dt).view(torch.int16).to(torch.int64) & 0xFFFF
        for i in range(0, len(vals) - 1, 2):
            got = _C_cuda.host_pack2(code, float(vals[i]), float(vals[i + 1]))
            assert got == int(bits[i]) | (int(bits[i + 1]) << 16), (dt, float(vals[i]), float(vals[i + 1]))


def test_mma_fragment_maps_cover_tiles_once():
    a, b, c = set(), set(), set()
    for lane in range(32):
        fa, fb, fc = _C_cuda.host_mma_coords(lane)
        a.update(fa)
        b.update(fb)
        c.update(fc)
        assert len(fa) == 8 and len(fb) == 4 and len(fc) == 4
        g, t = lane >> 2, lane & 3
        # spot-check the PTX ISA table
        assert fa[0] == (g, 2 * t) and fa[3] == (g + 8, 2 * t + 1) and fa[4] == (g, 2 * t + 8)
        assert fb[0] == (2 * t, g) and fb[3] == (2 * t + 9, g)
        assert fc[0] == (g, 2 * t) and fc[3] == (g + 8, 2 * t + 1)
    assert a == {(r, k) for r in range(16) for k in range(16)}
    assert b == {(k, n) for k in range(16) for n in range(8)}
    assert c == {(r, n) for r in range(16) for n in range(8)}


def test_kperm_gives_each_thread_four_consecutive_indices():
    perm = [_C_cuda.host_kperm(s) for s in range(16)]
    assert sorted(perm) == list(range(16))
    for t in range(4):
        assert sorted(perm[s] for s in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)) == list(range(4 * t, 4 * t + 4))
        # register order: the pair (2t, 2t+1) is (4t, 4t+1), the pair (2t+8, 2t+9) is (4t+2, 4t+3)
        assert perm[2 * t] == 4 * t and perm[2 * t + 9] == 4 * t + 3


@pytest.mark.parametrize("nf", [4, 8])
def test_bwd_column_permutation(nf):
    cols = {_C_cuda.host_bwd_col(f, c, nf) for f in range(nf) for c in range(8)}
    assert cols == set(range(8 * nf))
    for g in range(8):  # B fragment column g of every fragment: one aligned nf-column group
        assert sorted(_C_cuda.host_bwd_col(f, g, nf) for f in range(nf)) == list(range(nf * g, nf * g + nf))
    for t in range(4):  # accumulator columns 2t, 2t+1 of all fragments: 2*nf consecutive columns
        got = sorted(_C_cuda.host_bwd_col(f, c, nf) for f in range(nf) for c in (2 * t, 2 * t + 1))
        assert got == list(range(2 * nf * t, 2 * nf * t + 2 * nf))


def test_epilogue_value():
    g = torch.Generator().manual_seed(2)
    M, N, K, r = 5, 7, 9, 3
    U, B, G, A = (torch.randn(s, generator=g) for s in ((M, r), (N, r), (M, r), (r, K)))
    bias = torch.randn(N, generator=g)
    s = 0.75
    for m in range(M):
        for n in range(N):
            got = _C_cuda.host_epilogue_value(False, m, n, N, 1.5, bias.data_ptr(), U.data_ptr(),
                                              B.data_ptr(), r, s, 0.0, 0)
            assert got == pytest.approx(1.5 + float(bias[n]) + s * float(U[m] @ B[n]), rel=1e-6)
    p, seed = 0.3, 12345
    mask = default.dropout_mask(M, K, p, seed, "cpu")
    for m in range(M):
        for k in range(K):
            got = _C_cuda.host_epilogue_value(True, m, k, K, -2.0, 0, G.data_ptr(), A.data_ptr(), r, s,
                                              p, seed)
            ga = float(G[m] @ A[:, k]) * (1 / (1 - p)) if mask[m, k] else 0.0
            assert got == pytest.approx(-2.0 + s * ga, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------- CPU emulation of the GEMM
def _quantize(N, K, blocksize, double_quant, g):
    w = torch.randn(N, K, generator=g)
    q = nl.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    return q


def _w_args(q):
    nested = q.double_quant
    return (q.packed.data_ptr(), 0 if nested else q.absmax.data_ptr(),
            q.absmax.data_ptr() if nested else 0,
            q.absmax2.data_ptr() if nested else 0, q.code8.data_ptr() if nested else 0,
            float(q.offset), q.blocksize)


EMU_CASES = [
    # cfg, bwd, M, N, K, blocksize, double_quant, r, dropout_p
    (0, False, 1, 40, 96, 64, True, 0, 0.0),     # K = 96: 64-blocks straddle W rows
    (0, False, 3, 264, 160, 32, False, 5, 0.0),  # N > one 256 tile, LoRA r = 5
    (0, True, 16, 72, 96, 64, True, 16, 0.3),    # backward, dropout mask in the epilogue
    (1, False, 17, 130, 224, 128, True, 20, 0.0),  # r = 20: two LoRA mma chunks
    (1, True, 65, 40, 288, 64, False, 3, 0.1),
    (2, False, 130, 72, 96, 4096, True, 16, 0.0),  # blocksize > N*K: one block
    (2, True, 131, 136, 160, 32, True, 7, 0.5),
]


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "cfg{}-{}-M{}N{}K{}".format(
    c[0], "bwd" if c[1] else "fwd", c[2], c[3], c[4]))
def test_emulated_gemm_matches_reference(case, dtype):
    cfg, bwd, M, N, K, bs, dq, r, p = case
    g = torch.Generator().manual_seed(hash(case) & 0xFFFF)
    tdt = TORCH_DT[dtype]
    q = _quantize(N, K, bs, dq, g)
    red, ncols = (N, K) if bwd else (K, N)
    act = torch.randn(M, red, generator=g).to(tdt)
    scaling, seed = 0.5, 4242
    left = torch.randn(M, r, generator=g) if r else None
    right = (torch.randn(r, K, generator=g) if bwd else torch.randn(N, r, generator=g)) if r else None
    bias = None if bwd else torch.randn(N, generator=g)
    out = torch.full((M, ncols), float("nan"))
    _C_cuda.emulate_gemm(cfg, bwd, dtype, act.data_ptr(), M, *_w_args(q), N, K,
                         0 if bias is None else bias.data_ptr(), 0 if left is None else left.data_ptr(),
                         0 if right is None else right.data_ptr(), r, scaling, p if bwd else 0.0, seed,
                         out.data_ptr())
    # Reference: what the kernel computes by design, in fp64: W dequantized in fp32 and rounded to
    # the activation dtype; LoRA factors (scaling * left) and right rounded to it; mask from the
    # pure-torch twin.
    w = default.dequantize_nf4(q.packed, q.absmax, q.absmax2, q.code8, q.offset, q.blocksize,
                               [N, K], torch.float32).to(tdt).double()
    a = act.double()
    ref = a @ w if bwd else a @ w.t()
    if r:
        lo = (scaling * left).to(tdt).double()
        ro = right.to(tdt).double()
        lora = lo @ ro if bwd else lo @ ro.t()
        if bwd and p > 0:
            mask = default.dropout_mask(M, K, p, seed, "cpu")
            lora = torch.where(mask, lora * (1.0 / (1.0 - p)), torch.zeros_like(lora))
        ref = ref + lora
    if bias is not None:
        ref = ref + bias.double()
    assert not torch.isnan(out).any(), "unwritten outputs"
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-5, err


def test_emulation_rejects_ineligible_shapes():
    g = torch.Generator().manual_seed(3)
    q = _quantize(8, 40, 32, False, g)
    act = torch.zeros(2, 40, dtype=torch.bfloat16)
    out = torch.empty(2, 8)
    with pytest.raises(ValueError):
        _C_cuda.emulate_gemm(0, False, BF16, act.data_ptr(), 2, *_w_args(q), 8, 40, 0, 0, 0, 0, 1.0,
                             0.0, 0, out.data_ptr())
