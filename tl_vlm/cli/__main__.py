"""``python -m tl_vlm.cli`` (what torchrun runs)."""

import sys

from tl_vlm.cli import main

sys.exit(main())
