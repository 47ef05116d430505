import sys, time, torch
from llamba.bench.kernels import SCAN_SHAPES, _scan_inputs, kernel_times, _rel
from llamba.ops.ssd import triton_chunk as tc, cuda_backward as cb
t = time.time(); cb._kernel(0, 128, 128, False, False); print("compile s", time.time() - t, flush=True)
for batch, T, H, P, N in SCAN_SHAPES:
    torch.manual_seed(0)
    x, B, C, la = _scan_inputs(batch, T, H, P, "cuda", N=N)
    dy = torch.randn_like(x)
    with torch.no_grad():
        fwd = sum(kernel_times(lambda: tc.ssd_chunk_triton(x, B, C, la)).values())
    _, _, states = tc._forward(x, B, C, la, None, None, keep_states=True)
    bwd = lambda: tc._backward(x, B, C, la, None, states, dy, None, None, False)
    out = {}
    for route in ("never", "always"):
        tc.CUDA_BACKWARD = route
        res = bwd()
        kt = kernel_times(bwd)
        out[route] = (sum(kt.values()), res, {k[:40]: round(v * 1e3, 1) for k, v in kt.items()})
    err = max(_rel(a, b) for a, b in zip(out["always"][1], out["never"][1]))
    print(f"B{batch} T{T} H{H} P{P} N{N}: fwd {fwd:.3f} ms | triton bwd {out['never'][0]:.3f} ({out['never'][0]/fwd:.2f}x) "
          f"| cuda bwd {out['always'][0]:.3f} ({out['always'][0]/fwd:.2f}x) | rel diff {err:.1e}", flush=True)
    print("   ", out["always"][2], flush=True)
