import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads
# this variable when a kernel is decorated, so it must be set before sdpa_pass is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
