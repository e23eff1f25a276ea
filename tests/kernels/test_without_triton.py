"""Without triton installed, every entry point still works on its PyTorch path."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a machine without it
import torch
import optim.triton_ns, kimi_train.kernels.max_logits_triton, kimi_train.kernels.grouped_gemm_triton
for mod, name in (("optim.triton_ns", "ns_iterate_triton"),
                  ("kimi_train.kernels.max_logits_triton", "max_logits_triton"),
                  ("kimi_train.kernels.grouped_gemm_triton", "grouped_gemm_triton")):
    module = sys.modules[mod]
    assert module.TRITON_AVAILABLE is False and not hasattr(module, name), mod
from optim.newton_schulz import newton_schulz
from kimi_train.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference
from kimi_train.model.max_logits import per_head_max_logits, per_head_max_logits_reference
G = torch.randn(8, 12)
assert torch.equal(newton_schulz(G, backend="auto"), newton_schulz(G, backend="torch"))
q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
torch.testing.assert_close(per_head_max_logits(q, k, 0.3), per_head_max_logits_reference(q, k, 0.3))
x, w, offs = torch.randn(4, 16), torch.randn(2, 16, 8), torch.tensor([1, 4], dtype=torch.int32)
torch.testing.assert_close(grouped_gemm(x, w, offs), grouped_gemm_reference(x, w, offs))
try:
    grouped_gemm(x, w, offs, backend="triton")
    raise SystemExit("backend='triton' ran without triton")
except RuntimeError as e:
    assert "needs triton" in str(e)
print("ok")
'''


def test_pytorch_paths_without_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]
