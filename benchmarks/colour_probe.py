"""Does the fusion carry what a question asks about into the token that names it? (not in CI)

`python benchmarks/colour_probe.py MODEL_DIR [--images 200]` asks "what color is the {shape}?"
about every object whose shape is unique in fresh world scenes (seed 3000) and fits linear
probes of the object's colour, on two thirds of the questions, tested on the rest, from:

- `c3`, `lateral3`, `p3`: at the object's centre, the backbone's stride-8 map, the FPN's 1x1
  lateral of it, and P3 (what the fusion reads);
- `read{k}`: layer k's token-to-region attention of the shape word applied to the tower's input
  regions (what that word could read, were the values the raw features);
- `delta{k}`: layer k's cross-attention update of the shape word;
- `fused{k}`: the shape word after layer k (fusion, then its text layer); the last one is what
  the VQA head pools;
- `pooled`: the VQA head's attention-pooled question vector;
- `head_p3`: the tower's output at the object's centre (what the grounding head scores words
  against); `head_read`: the last layer's attention of the shape word applied to the tower's
  output regions (what that word could read of them).

Per-shape-word means are removed first (which word it is would otherwise dominate), then the
top 48 principal components are kept. Also prints the share of the word's attention that lands
inside the object's box, per layer. VQA can only answer colour questions from the image if the
colour survives to `fused` and `pooled`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from model_export.checkpoints.weights import load_model
from model_export.data.world import COLOR_NAMES, render_index
from model_export.modeling.cross_attention import flatten_levels
from model_export.processing.preprocess import batch_images, preprocess_image
from model_export.processing.prompt import load_tokenizer, tokenize

SEED = 3000  # a world seed no training or evaluation uses
COMPONENTS = 48


def region_centres(visual: list[Tensor]) -> Tensor:
    """(R, 2) x, y in model-input pixels of every region, in `flatten_levels` order."""
    centres = []
    for level, feature in enumerate(visual):
        stride = 2 ** (3 + level)
        ys = (torch.arange(feature.shape[2]) + 0.5) * stride
        xs = (torch.arange(feature.shape[3]) + 0.5) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2))
    return torch.cat(centres)


def collect(model_dir: Path, images: int) -> tuple[dict[str, list[Tensor]], list[int],
                                                    list[str], list[list[float]]]:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model.config.language.tokenizer)
    layers = model.fusion.layers
    deltas: list[Tensor] = []
    outputs: list[Tensor] = []
    for layer in layers:
        layer.vl_fuse.attn.register_forward_hook(lambda m, i, o: deltas.append(o[1]))
        layer.register_forward_hook(lambda m, i, o: outputs.append(o[1]))
    features: dict[str, list[Tensor]] = defaultdict(list)
    colours, words, mass = [], [], [[] for _ in layers]
    with torch.no_grad():
        for index in range(images):
            scene = render_index(SEED, index)
            shapes = [o.shape for o in scene.objects]
            pixels, (height, width) = preprocess_image(scene.image, model.config.preprocess)
            sy, sx = height / scene.height, width / scene.width
            pixels, _ = batch_images([pixels], model.config.preprocess.size_divisibility)
            colour_map = model.image_colours(pixels)
            stages = model.backbone(pixels)
            lateral = model.fpn.inner_blocks[0](stages[0])
            visual = model.fpn(stages)
            regions, centres = flatten_levels(visual)[0], region_centres(visual)
            for obj in (o for o in scene.objects if shapes.count(o.shape) == 1):
                question = f"what color is the {obj.shape}?"
                ids, mask, encodings = tokenize(tokenizer, [question], max_length=256)
                word = encodings[0].char_to_token(question.index(obj.shape))
                deltas.clear()
                outputs.clear()
                with model.fusion.recording_text_attention() as maps:
                    out = model.fuse(visual, model.encode_text(ids, mask), colours=colour_map)
                x0, y0, x1, y1 = obj.box
                inside = ((centres[:, 0] >= x0 * sx) & (centres[:, 0] <= x1 * sx)
                          & (centres[:, 1] >= y0 * sy) & (centres[:, 1] <= y1 * sy))
                for k, attention in enumerate(maps):
                    weights = attention[0, :, word].mean(dim=0)  # heads averaged, (R,)
                    mass[k].append(float(weights[inside].sum()))
                    features[f"read{k}"].append(weights @ regions)
                    features[f"delta{k}"].append(deltas[k][0, word])
                    features[f"fused{k}"].append(outputs[k][0, word])
                cx, cy = (x0 + x1) / 2 * sx / 8, (y0 + y1) / 2 * sy / 8
                features["c3"].append(stages[0][0, :, int(cy), int(cx)])
                features["lateral3"].append(lateral[0, :, int(cy), int(cx)])
                features["p3"].append(visual[0][0, :, int(cy), int(cx)])
                features["head_p3"].append(out.fused_visual[0][0, :, int(cy), int(cx)])
                last = maps[-1][0, :, word].mean(dim=0)  # the last layer's, heads averaged
                features["head_read"].append(last @ flatten_levels(out.fused_visual)[0])
                features["pooled"].append(model.vqa_head.pool(out.fused_text, mask)[0])
                colours.append(COLOR_NAMES.index(obj.color))
                words.append(obj.shape)
    return features, colours, words, mass


def probe_accuracy(x: Tensor, labels: Tensor, groups: list[str], split: int) -> float:
    """Held-out accuracy of a linear colour probe (see the module docstring)."""
    x = x.clone()
    for group in set(groups):
        rows = torch.tensor([i for i, g in enumerate(groups) if g == group])
        train_rows = rows[rows < split]
        if len(train_rows):
            x[rows] -= x[train_rows].mean(dim=0)
    _, _, vt = torch.linalg.svd(x[:split], full_matrices=False)
    x = x @ vt[:COMPONENTS].t()
    x = x / (x[:split].std(dim=0) + 1e-6)
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], len(COLOR_NAMES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(x[:split]), labels[:split]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(x[split:]).argmax(dim=1) == labels[split:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    features, colours, words, mass = collect(args.model, args.images)
    labels = torch.tensor(colours)
    split = len(labels) * 2 // 3
    majority = torch.bincount(labels[split:]).max().item() / (len(labels) - split)
    print(f"{len(labels)} questions; majority colour of the held-out third: {majority:.2f}")
    print("attention inside the object's box, per layer: "
          + ", ".join(f"{sum(m) / len(m):.2f}" for m in mass))
    for name, rows in features.items():
        accuracy = probe_accuracy(torch.stack(rows), labels, words, split)
        print(f"{name:8s} colour probe accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()
