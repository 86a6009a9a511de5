"""``clipkd`` with the benchmark's model configs registered first (run by torchrun from data_throughput.py)."""
import sys
from pathlib import Path

import open_clip

from harness.cli import main

open_clip.add_model_config(Path(__file__).with_name("model_configs"))
sys.exit(main())
