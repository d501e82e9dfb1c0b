"""GPU checks of the PyTorch runtime (run on a GPU host; not part of CI).

`python benchmarks/gpu_check.py [--out report.json]` on random-weight `glip-t` (the shipped
model's text encoder comes from a package a GPU host may lack; parity and speed do not need
trained weights):

1. CUDA FP32 parity: `TorchRuntime(device="cuda")` vs CPU for `vision`, `language`, `fusion` at
   800x1344 with a 256-token prompt, TF32 off: max |diff| / max |reference| per output.
2. FP16 parity: the same graphs under CUDA autocast (FP16) vs CUDA FP32.
3. Throughput of vision + fusion (256 tokens) at 800x1344 per batch size, TF32 FP32 and FP16,
   images/s; and the small preset at its serving size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.graphs import LEVELS
from engines.runtimes.torch_eager import TorchRuntime
from model_export.modeling.config import get_preset
from model_export.modeling.model import Glipv2Model


def text_inputs(batch: int, tokens: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (batch, tokens), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_graphs(runtime: TorchRuntime, images: torch.Tensor, text: dict[str, torch.Tensor],
               fp16: bool = False) -> dict[str, torch.Tensor]:
    context = (torch.autocast("cuda", dtype=torch.float16) if fp16 else nullcontext())
    with context:
        visual = runtime.run("vision", {"images": images})
        language = runtime.run("language", text)
        fused = runtime.run("fusion", {**visual, "hidden": language["hidden"],
                                       "attention_mask": text["attention_mask"]})
    outputs = {f"vision.{k}": v for k, v in visual.items()}
    outputs |= {f"language.{k}": v for k, v in language.items()}
    outputs |= {f"fusion.{k}": v for k, v in fused.items()}
    return {k: v.float() for k, v in outputs.items()}


def compare(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    worst_name, worst = "", 0.0
    per_output = {}
    for name, ref in reference.items():
        diff = (ref - other[name]).abs().max().item()
        relative = diff / max(ref.abs().max().item(), 1e-12)
        per_output[name] = relative
        if relative > worst:
            worst_name, worst = name, relative
    return {"max_relative": worst, "worst_output": worst_name, "per_output": per_output}


def throughput(model: Glipv2Model, height: int, width: int, tokens: int, batch: int,
               fp16: bool, iters: int = 10) -> float:
    device = "cuda"
    images = torch.randn(batch, 3, height, width, device=device)
    text = {k: v.to(device) for k, v in text_inputs(batch, tokens,
                                                    model.config.language.vocab_size).items()}
    context = torch.autocast("cuda", dtype=torch.float16) if fp16 else nullcontext()
    with torch.no_grad(), context:
        hidden = model.encode_text(text["input_ids"], text["attention_mask"])

        def step() -> None:
            visual = model.encode_image(images)
            model.fuse(visual, hidden)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the CPU reference")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    torch.manual_seed(0)
    model = Glipv2Model(get_preset("glip-t")).eval()
    height, width, tokens = 800, 1344, 256
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    text = text_inputs(1, tokens, model.config.language.vocab_size)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if not args.skip_cpu:
        torch.set_num_threads(16)
        start = time.perf_counter()
        cpu = run_graphs(TorchRuntime(model), images, text)
        report["cpu_seconds"] = time.perf_counter() - start
    gpu_runtime = TorchRuntime(model, device="cuda")
    cuda_fp32 = run_graphs(gpu_runtime, images, text)
    if not args.skip_cpu:
        report["cuda_fp32_vs_cpu"] = compare(cpu, cuda_fp32)
        print("CUDA FP32 vs CPU:", report["cuda_fp32_vs_cpu"]["max_relative"],
              report["cuda_fp32_vs_cpu"]["worst_output"], flush=True)
    cuda_fp16 = run_graphs(gpu_runtime, images, text, fp16=True)
    report["cuda_fp16_vs_fp32"] = compare(cuda_fp32, cuda_fp16)
    print("CUDA FP16 vs FP32:", report["cuda_fp16_vs_fp32"]["max_relative"],
          report["cuda_fp16_vs_fp32"]["worst_output"], flush=True)
    tokens_fp16 = cuda_fp16["fusion.token_logits_p3"]
    tokens_fp32 = cuda_fp32["fusion.token_logits_p3"]
    report["token_logit_sign_agreement_p3"] = float(
        ((tokens_fp16 > 0) == (tokens_fp32 > 0)).float().mean())

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu_model = gpu_runtime.model
    speeds = {}
    for fp16 in (False, True):
        for batch in (1, 4, 8):
            key = f"glip-t {height}x{width} {tokens} tok batch {batch} {'fp16' if fp16 else 'tf32'}"
            speeds[key] = throughput(gpu_model, height, width, tokens, batch, fp16)
            print(f"{key}: {speeds[key]:.1f} img/s", flush=True)
    small = Glipv2Model(get_preset("small")).eval().to("cuda")
    for batch in (1, 8, 32):
        key = f"small 288x448 32 tok batch {batch} tf32"
        speeds[key] = throughput(small, 288, 448, 32, batch, False)
        print(f"{key}: {speeds[key]:.1f} img/s", flush=True)
    report["throughput_img_s"] = speeds
    report["levels"] = list(LEVELS)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
