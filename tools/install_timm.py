"""Install timm beside the CPU build of torch without replacing torch (used by README setup and .ci/run).

The newest torchvision pulls another torch; torchvision 0.28.0 keeps torch but its compiled ops cannot load
beside the CPU torch, and ``import torchvision`` then fails on two unguarded ``register_fake`` decorators
(``torchvision::nms`` / ``qnms``) in ``torchvision/_meta_registrations.py``. This installs timm and that
torchvision without dependencies and guards those two decorators (timm does not use those ops). Idempotent.
"""

import importlib.util
import pathlib
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "timm==1.0.31",
                       "torchvision==0.28.0"])
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    new = (f'@(torch.library.register_fake("torchvision::{op}") if hasattr(torch.ops.torchvision, "{op}") '
           f'else (lambda f: f))  # guarded by locattn tools/install_timm.py\n')
    text = text.replace(old, new)
path.write_text(text)
subprocess.check_call([sys.executable, "-c", "import torch, timm; assert torch.__version__.startswith('2.13')"])
print("timm ready:", path)
