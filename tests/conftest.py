import sys
from pathlib import Path

import torch

# Tests run on 2-core CI machines; more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))
sys.path.insert(0, str(Path(__file__).parent))
