"""One-call GPU check and timing of the Triton backend (for a lent GPU; see DESIGN section 7).

    python tools/triton_gpu_check.py [--out DIR] [--tokens 8192] [--smoke]

Runs the CUDA tests' kind of check at Gemma-2 scale (bf16, H=3584, V=256000, softcap 30) against
the chunked ``torch`` backend (float32 math; a float64 reference does not fit at this size),
then times forward and forward+backward of ``triton`` and ``torch`` with ``triton.testing.do_bench``
(median), and prints them next to the matmul floor 6NHV / 800 TFLOP/s (DESIGN section 2).
Writes ``triton_gpu_check.json`` under ``--out`` (default ``$OUT`` or ``.``).
``--smoke`` uses tiny shapes so the script itself can be checked on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    from simpo_kernels import simpo_loss
    from tests.reference import rel_err

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    H, V, T = (3584, 256000, 2048) if not args.smoke else (40, 300, 16)
    rows = max(2, args.tokens // T) if not args.smoke else 2
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(rows, T, H, device=dev, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=dev, generator=g) * (20 / H ** 0.5)).to(dtype)
    labels = torch.randint(0, V, (rows, T), device=dev, generator=g)
    labels[:, : T // 4] = -100  # prompt
    opts = dict(beta=10.0, gamma_beta_ratio=0.5, softcap=30.0)

    def run(backend, backward=True, **kw):
        h, w = hidden.clone().requires_grad_(backward), weight.clone().requires_grad_(backward)
        out = simpo_loss(h, w, labels, backend=backend, **opts, **kw)
        if backward:
            out.loss.backward()
        return out, h.grad, w.grad

    result = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "N": rows * T, "H": H, "V": V,
              "dtype": str(dtype)}
    ref, rh, rw = run("torch")
    for mode in (False, True):
        out, dh, dw = run("triton", grad_filter=mode)
        result[f"check_filter{mode}"] = {"loss": rel_err(out.loss, ref.loss), "dH": rel_err(dh, rh), "dW": rel_err(dw, rw)}
    if dev == "cuda":
        import triton.testing
        N = rows * T
        result["floor_ms_6NHV_at_800TF"] = 6 * N * H * V / 800e12 * 1e3
        for backend in ("triton", "torch"):
            for bwd in (False, True):
                fn = (lambda b=backend, k=bwd: run(b, backward=k)) if bwd else \
                     (lambda b=backend: simpo_loss(hidden, weight, labels, backend=b, **opts))
                result[f"ms_{backend}_{'fwd_bwd' if bwd else 'fwd'}"] = triton.testing.do_bench(
                    fn, warmup=200, rep=2000, return_mode="median")
        result["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    for k, v in result.items():
        print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
