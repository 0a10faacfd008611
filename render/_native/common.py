"""Constants shared by the native kernels (float32, so they never widen float32 maths)."""

import numpy as np

ALPHA_MIN = np.float32(1.0 / 255.0)  # Gaussians fainter than this at a pixel are skipped
MAX_EXTEND = np.float32(3.33)  # cap of the opacity-aware radius, in standard deviations
