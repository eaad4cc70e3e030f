"""A STAND-IN for Rockchip's rkllm-toolkit, for the tests of host.convert's subprocess protocol only.

It is not the toolkit and says so: it prints that on import (into the build log), host.rkllm_runner
--probe reports STANDIN, and its export writes a file only when the test asks (STANDIN_RKLLM_EXPORT=1),
a text file that says it is no model. It reads the calibration set the way the 1.3.0 layouts are
laid out, so the protocol's checks have something real to observe, and nothing it computes is a
quantization result. The tests put this folder on PYTHONPATH; nothing else ever should.
"""

import sys

STANDIN = True
__version__ = "0+standin"

print("rkllm STAND-IN (tests/standin_rkllm): not Rockchip's rkllm-toolkit; nothing it writes is a model",
      file=sys.stderr, flush=True)
