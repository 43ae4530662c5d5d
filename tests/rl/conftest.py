"""Make this folder's tiny task and fixed base policy importable as ``toys`` (a residual checkpoint over the toy
base names that module, so loading it imports it again)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
