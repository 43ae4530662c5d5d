"""``python -m robolearn.cli`` (what ``torchrun -m robolearn.cli train ...`` runs)."""
import sys

from robolearn.cli import main

sys.exit(main())
