"""Files shipped with the package: the demo text-to-image weights trained by the project's own scripts."""

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_CHECKPOINT = os.path.join(ASSETS_DIR, "demo-shapes.safetensors")
