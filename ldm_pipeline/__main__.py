"""`python -m ldm_pipeline ...` is `ldm-generate ...` (and works under `accelerate launch -m`)."""

import sys

from ldm_pipeline.generate import main

sys.exit(main())
