"""Where a banded step's time goes on a GPU: step times of ResNet-50 (frozen BN, 2×3×1024²) plain and banded,
and a ``torch.profiler`` table of one OverL 16 step (host time per operator, the kernels' GPU time, launches).

    python scripts/gpu_profile.py          # needs CUDA (README, "On a GPU")
"""

from __future__ import annotations

import copy
import time

import torch
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_lrcnn import to_row_centric
from lightning_lrcnn.convert import plan_for


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py needs a CUDA device (none found); on a CPU use scripts/bench.py")
    device = torch.device("cuda")
    plain = torchvision.models.resnet50(weights=None).to(device).train()
    for m in plain.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    x = torch.randn(2, 3, 1024, 1024, device=device)

    def step(model: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(x).pow(2).mean().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    for method in ("overl:16", "overl:4", "2ps:4"):
        mode, rows = method.split(":")
        model = to_row_centric(copy.deepcopy(plain), mode=mode, rows=int(rows), batchnorm="freeze")
        plan_for(model, x)
        step(model), step(plain)
        print(method, "plain s", [round(step(plain), 3) for _ in range(3)],
              "banded s", [round(step(model), 3) for _ in range(3)], flush=True)
        if method == "overl:16":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(model)
            events = prof.key_averages()
            print(events.table(sort_by="self_cpu_time_total", row_limit=20))
            kernels = [e for e in events if e.device_type.name == "CUDA"]
            print(f"GPU kernel time {sum(e.self_device_time_total for e in kernels) / 1e3:.1f} ms, "
                  f"{sum(e.count for e in kernels)} kernels")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
