import os
import sys
from pathlib import Path

# No test may reach the network: huggingface_hub (and transformers through it) must stay offline.
os.environ["HF_HUB_OFFLINE"] = "1"

import mlx.core as mx  # noqa: E402

# Test helpers (tiny_models, tiny_tokenizer, ...) are plain modules beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# The CPU backend is the one CI has; float32 there is what parity is measured in.
mx.set_default_device(mx.cpu)
