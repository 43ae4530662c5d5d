"""Make this folder's tiny task and fixed base policy importable as ``toys`` (a residual checkpoint over the toy
base names that module, so loading it imports it again)."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)  # small nets: threads only add overhead, and the suite shares two cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
