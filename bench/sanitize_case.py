"""Small cases of every CUDA linear path, for compute-sanitizer (memcheck/racecheck) in
bench/gpu_check.sh: forced SIMT / GEMV / GEMM forward and backward, split-K, LoRA + dropout."""
import torch

import nf4lora as nl
from nf4lora import _C_cuda

dev = "cuda"
stream = torch.cuda.current_stream().cuda_stream
for (M, N, K, bs) in ((2, 136, 320, 64), (19, 72, 96, 32), (130, 40, 160, 128)):
    w = torch.randn(N, K, device=dev)
    q = nl.quantize_nf4(w, blocksize=bs, double_quant=True)
    for bwd in (False, True):
        red, ncols = (N, K) if bwd else (K, N)
        a = torch.randn(M, red, device=dev, dtype=torch.bfloat16)
        out = torch.empty(M, ncols, device=dev, dtype=torch.bfloat16)
        for path in (0, 1, 2):
            plan = _C_cuda.linear_plan(M, N, K, bwd, 2, True, path)
            if not plan["ok"]:
                continue
            ws = torch.empty(max(plan["ws_floats"], 1), device=dev)
            r = 5
            A = torch.randn(r, K, device=dev)
            args = (a.data_ptr(), 2, M, q.packed.data_ptr(), 0, q.absmax.data_ptr(),
                    q.absmax2.data_ptr(), q.code8.data_ptr(), q.offset, bs, N, K)
            if bwd:  # g = dy B [M, r] given
                g = torch.randn(M, r, device=dev)
                _C_cuda.qlora_backward_dx(*args, A.data_ptr(), r, 0.5, 0.1, 7, g.data_ptr(),
                                          out.data_ptr(), ws.data_ptr(), ws.numel(), stream, path)
            else:  # the launch writes u = D(x) A^T itself
                bias, B = torch.randn(N, device=dev), torch.randn(N, r, device=dev)
                u = torch.empty(M, r, device=dev)
                _C_cuda.qlora_forward(*args, bias.data_ptr(), A.data_ptr(), B.data_ptr(), r, 0.5,
                                      0.1, 7, out.data_ptr(), u.data_ptr(), ws.data_ptr(),
                                      ws.numel(), stream, path)
            torch.cuda.synchronize()
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(4, K, device=dev, requires_grad=True)
    B = torch.randn(N, 4, device=dev, requires_grad=True)
    nl.qlora_linear(x, q, A, B, 2.0, dropout_p=0.1).float().sum().backward()
    torch.cuda.synchronize()
print("sanitize_case: done")
