"""Other ways to run a weight-only quantized linear at M = 1 (GPU), beside bf16 F.linear, for shapes
of the 8B models: candidates for the kernels of `oiv2compile.kernels._quant_matmul`, none wired in.

- int8 through Inductor: `F.linear(x, q.to(bf16)) * s` compiled (coordinate descent on), so the
  conversion fuses into Inductor's own matrix-vector reduction;
- int4 through PyTorch's tinygemm (`aten._weight_int4pack_mm`, group 128; its packed layout is made
  on the device by `aten._convert_weight_to_int4pack`);
- int4 through Inductor: nibbles unpacked, (q - z) * s per group, F.linear, compiled.

Times are CUDA-graph replays of 20 calls; shares are the weight bytes over time against the copy
bandwidth of the same run. Random weights: timing only.

    PYTHONPATH=. python benchmarks/compare_quant_paths.py --shapes 14336x4096,4096x14336
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from oiv2compile.bench import copy_bandwidth_gbs

GROUP = 128


def replay_us(fn, *args) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    return Timer("g.replay()", globals={"g": graph}).blocked_autorange(min_run_time=0.5).median / 20 * 1e6


def int8_inductor(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype)) * s


def int4_inductor(x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    w = torch.cat([(packed & 0xF).to(x.dtype), (packed >> 4).to(x.dtype)], dim=1)  # [N, K]
    n, k = w.shape
    w = (w.view(n, k // GROUP, GROUP) - z[..., None]) * s[..., None]
    return F.linear(x, w.view(n, k))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="14336x4096,4096x14336", help="N x K, comma-separated")
    args = parser.parse_args()
    torch._inductor.config.coordinate_descent_tuning = True
    device = torch.device("cuda")
    bw = copy_bandwidth_gbs(device)
    print(f"copy {bw:.0f} GB/s on {torch.cuda.get_device_name()}")
    compiled8 = torch.compile(int8_inductor, dynamic=False)
    compiled4 = torch.compile(int4_inductor, dynamic=False)

    def share(nbytes: float, us: float) -> str:
        return f"{us:.1f} us ({nbytes / us / 1e3 / bw:.0%})"

    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        q = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        s = torch.rand(n, device=device, dtype=torch.bfloat16)
        packed = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
        tinygemm = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        scale_zero = torch.rand(k // GROUP, n, 2, device=device, dtype=torch.bfloat16)
        s4 = torch.rand(n, k // GROUP, device=device, dtype=torch.bfloat16)
        z4 = torch.rand(n, k // GROUP, device=device, dtype=torch.bfloat16)
        row = [
            f"{n}x{k}: bf16 {share(n * k * 2, replay_us(F.linear, x, w))}",
            f"int8 inductor {share(n * k, replay_us(compiled8, x, q, s))}",
            f"tinygemm int4 g{GROUP} {share(n * k / 2, replay_us(torch.ops.aten._weight_int4pack_mm, x, tinygemm, GROUP, scale_zero))}",
            f"int4 inductor {share(n * k / 2, replay_us(compiled4, x, packed, s4, z4))}",
        ]
        print(" | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
