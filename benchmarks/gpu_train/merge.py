"""Here: the shards `pack.py` wrote there, back into one model folder.

`python benchmarks/gpu_train/merge.py SHARDS MODEL_DIR OUT`: SHARDS is the call's fetched files,
MODEL_DIR the model the run started from (its `config.json` is copied), OUT the new model folder.
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file
from state_file import read_state

shards_dir, model_dir, out = (Path(arg) for arg in sys.argv[1:4])
shards = sorted(shards_dir.glob("shard*.safetensors"))
read = [read_state(shard) for shard in shards]
metadata = read[0][1]
state = {key: value for tensors, _ in read for key, value in tensors.items()}
out.mkdir(parents=True, exist_ok=True)
save_file(state, str(out / "model.safetensors"), metadata=metadata)
shutil.copy(model_dir / "config.json", out)
for name in ("progress.json", "train_config.json", "train_log.jsonl"):
    if (shards_dir / name).exists():
        shutil.copy(shards_dir / name, out)
print("merged", len(state), "tensors from", len(shards), "shards into", out)
