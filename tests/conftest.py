import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when Ray workers or subprocesses run beside the test.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def digits_cfg():
    from lsep_tune.config import load_config

    return load_config(preset="digits")
