import sys
from pathlib import Path

import mlx.core as mx

# Test helpers (tiny_models, tiny_tokenizer) are plain modules beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

# The CPU backend is the one CI has; float32 there is what parity is measured in.
mx.set_default_device(mx.cpu)
