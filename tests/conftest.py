import torch

# The test models are tiny: one thread avoids thread start-up and contention costs that dominate
# at this size (and keeps the suite's timing stable on a busy 2-core machine).
torch.set_num_threads(1)
