import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # stable timings on a shared 2-core machine; the models are small
