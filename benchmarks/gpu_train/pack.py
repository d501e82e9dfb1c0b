"""On the GPU host: the trained weights as <= 15 MB fp32 shards (the transfer limit is 16 MB)."""
import os
import shutil
import sys

from safetensors.torch import save_file
from state_file import read_state

run, out = sys.argv[1], sys.argv[2]
path = os.path.join(run, "model.safetensors")
state, metadata = read_state(path)
shards, current, size = [], {}, 0
for key, tensor in state.items():
    nbytes = tensor.numel() * tensor.element_size()
    if current and size + nbytes > 15_000_000:
        shards.append(current)
        current, size = {}, 0
    current[key] = tensor
    size += nbytes
shards.append(current)
for index, shard in enumerate(shards):
    save_file(shard, os.path.join(out, f"shard{index}.safetensors"), metadata=metadata)
for name in ("progress.json", "train_log.jsonl", "train_config.json"):
    if os.path.exists(os.path.join(run, name)):
        shutil.copy(os.path.join(run, name), out)
print("packed", len(state), "tensors into", len(shards), "shards")
