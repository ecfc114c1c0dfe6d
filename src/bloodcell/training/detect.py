"""Train the cell detector (models.detector) on box sets from one lab or several.

``train_detector(sources, out, ...)`` reads every source (data.boxes: VOC, YOLO, CSV), trains on
their train splits and writes a run folder: ``detector.pt`` (the network, its classes, input size
and the score threshold per class), ``metrics.json`` (AP at IoU 0.5, precision and recall per class
and per source on the val splits), ``history.csv`` and ``config.yaml``. The threshold is the one
with the best F1 on the training sources' val splits: a held-out lab never chooses it.

Each source trains only the classes it annotates: BCCD's VOC boxes are red cells only, so its
fields teach the red-cell maps and leave the white-cell maps alone (the loss is masked per class).

Augmentation is what another microscope changes: scale (0.6-1.5 x, as another magnification),
flips and right-angle turns, and colour (per-channel gain, brightness, contrast, a hue turn, and
grey now and then, as another stain).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bloodcell.catalog import MEAN, STD
from bloodcell.data.boxes import BoxField, BoxSet, class_order, discover_boxes
from bloodcell.data.images import decode_field
from bloodcell.errors import BloodcellError
from bloodcell.metrics import best_threshold, detection_scores
from bloodcell.models.detector import (
    STRIDE,
    CellDetector,
    background,
    decode,
    field_batch,
    normalise,
)
from bloodcell.runfiles import (
    atomic_write,
    check_out_dir,
    run_lock,
    write_csv,
    write_json,
    write_yaml,
)
from bloodcell.runtime import check_stop, set_threads
from bloodcell.training.engine import progress_bar

FORMAT = "bloodcell-detector/1"
# Fields are kept in memory at this multiple of the input size, so scaling up loses little.
KEEP_SCALE = 1.5


@dataclass(frozen=True)
class DetectConfig:
    """What one detector training does."""

    input_size: int = 320  # the field's long side, in pixels, as the network sees it
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 32  # the backbone's first width (channels grow to 4x)
    scale_min: float = 0.6
    scale_max: float = 1.5
    seed: int = 0
    threads: int = 0

    def check(self) -> None:
        for name, lo, hi in (("input_size", 64, 2048), ("epochs", 1, 10_000), ("batch_size", 1, 1024),
                             ("width", 8, 256)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise BloodcellError(f"--{name.replace('_', '-')} must be an integer in [{lo}, {hi}], not {v!r}")
        if self.input_size % 32:
            raise BloodcellError(f"--input-size must be a multiple of 32, not {self.input_size}")
        for name in ("lr", "weight_decay", "scale_min", "scale_max"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise BloodcellError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {v!r}")
        if not 0 < self.scale_min <= self.scale_max <= 4:
            raise BloodcellError("the scale range must satisfy 0 < --scale-min <= --scale-max <= 4")


@dataclass
class Loaded:
    """A field kept in memory for training: its pixels at KEEP_SCALE x the input size and its boxes
    in those pixels, with the classes its source annotates."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray  # class index per box
    annotated: np.ndarray  # bool per class
    source: str


def load_sources(sources: list[str], seed: int = 0) -> list[BoxSet]:
    """discover_boxes for each source; a fatal problem is an error naming the source."""
    sets = []
    for s in sources:
        bs = discover_boxes(s, seed=seed)
        fatal = [p.detail for p in bs.problems if p.fatal]
        if fatal:
            raise BloodcellError(f"{s}: {fatal[0]}")
        sets.append(bs)
    return sets


def _load(fields: list[BoxField], classes: list[str], annotated: list[str], long_side: int) -> list[Loaded]:
    out = []
    mask = np.array([c in annotated for c in classes])
    for f in fields:
        img, scale, _ = decode_field(f.path, long_side)
        keep = [i for i, c in enumerate(f.labels) if c in classes]
        out.append(Loaded(img, f.boxes[keep] * scale, np.array([classes.index(f.labels[i]) for i in keep], np.int64),
                          mask, f.source))
    return out


def _gaussian(heat: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> None:
    h, w = heat.shape
    rx, ry = int(3 * sx) + 1, int(3 * sy) + 1
    x0, x1 = max(0, int(cx) - rx), min(w, int(cx) + rx + 1)
    y0, y1 = max(0, int(cy) - ry), min(h, int(cy) + ry + 1)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1)[None, :] - cx
    ys = np.arange(y0, y1)[:, None] - cy
    g = np.exp(-(xs * xs) / (2 * sx * sx) - (ys * ys) / (2 * sy * sy))
    np.maximum(heat[y0:y1, x0:x1], g, out=heat[y0:y1, x0:x1])


def targets(boxes: np.ndarray, labels: np.ndarray, n_classes: int, size: int):
    """Heat maps (a Gaussian per box centre, sized to the box), and log width / height with a mask,
    at stride 4 of a size x size input."""
    m = size // STRIDE
    heat = np.zeros((n_classes, m, m), np.float32)
    wh = np.zeros((2 * n_classes, m, m), np.float32)
    mask = np.zeros((n_classes, m, m), np.float32)
    for (x0, y0, x1, y1), k in zip(boxes, labels, strict=True):
        bw, bh = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2 / STRIDE - 0.5, (y0 + y1) / 2 / STRIDE - 0.5
        ix, iy = int(round(cx)), int(round(cy))
        if not (0 <= ix < m and 0 <= iy < m) or bw < 2 or bh < 2:
            continue
        _gaussian(heat[k], cx, cy, max(bw / STRIDE / 6, 0.7), max(bh / STRIDE / 6, 0.7))
        heat[k, iy, ix] = 1.0
        wh[2 * k, iy, ix], wh[2 * k + 1, iy, ix] = math.log(bw), math.log(bh)
        mask[k, iy, ix] = 1.0
    return heat, wh, mask


def _sample(f: Loaded, size: int, rng: np.random.Generator, cfg: DetectConfig):
    """One augmented size x size crop of a field, with its boxes: scaled (nearest pixel, which is
    enough at these scales), placed at random on a canvas of the field's background colour, flipped
    and turned."""
    img = f.image
    s = rng.uniform(cfg.scale_min, cfg.scale_max) / KEEP_SCALE  # the kept image's long side: KEEP_SCALE x size
    h, w = img.shape[:2]
    nh, nw = max(8, int(round(h * s))), max(8, int(round(w * s)))
    ys = np.minimum((np.arange(nh) + 0.5) / s, h - 1).astype(np.int64)
    xs = np.minimum((np.arange(nw) + 0.5) / s, w - 1).astype(np.int64)
    scaled = img[ys][:, xs]
    boxes = f.boxes * s
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = background(img)
    ox = int(rng.integers(min(0, size - nw), max(0, size - nw) + 1))
    oy = int(rng.integers(min(0, size - nh), max(0, size - nh) + 1))
    sx0, sy0 = max(0, -ox), max(0, -oy)
    dx0, dy0 = max(0, ox), max(0, oy)
    cw, ch = min(nw - sx0, size - dx0), min(nh - sy0, size - dy0)
    canvas[dy0:dy0 + ch, dx0:dx0 + cw] = scaled[sy0:sy0 + ch, sx0:sx0 + cw]
    boxes = boxes + np.array([ox, oy, ox, oy], np.float32)
    # keep a box whose centre is inside the crop, clipped to it
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    inside = (c >= 0).all(1) & (c < size).all(1)
    boxes, labels = np.clip(boxes[inside], 0, size), f.labels[inside]
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
        boxes = np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
    for _ in range(int(rng.integers(4))):  # a quarter turn counter-clockwise, boxes with it
        canvas = np.rot90(canvas)
        boxes = np.stack([boxes[:, 1], size - boxes[:, 2], boxes[:, 3], size - boxes[:, 0]], 1)
    return np.ascontiguousarray(canvas), boxes.reshape(-1, 4), labels


def colour_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Another stain and camera on a float batch in [0, 1]: per-channel gain, brightness, contrast,
    a hue turn (about the grey axis) and, for one field in five, grey."""
    n = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    x = x * (0.8 + 0.4 * r(n, 3, 1, 1))
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (0.7 + 0.6 * r(n, 1, 1, 1)) + mean * (0.8 + 0.4 * r(n, 1, 1, 1))
    theta = (r(n) - 0.5) * (math.pi / 3)  # +-30 degrees of hue
    cos, sin = torch.cos(theta), torch.sin(theta)
    k = 1 / 3
    s3 = math.sqrt(1 / 3)
    # Rodrigues' rotation about the (1,1,1)/sqrt(3) axis in RGB space
    rot = torch.stack([
        torch.stack([cos + (1 - cos) * k, k * (1 - cos) - s3 * sin, k * (1 - cos) + s3 * sin], -1),
        torch.stack([k * (1 - cos) + s3 * sin, cos + (1 - cos) * k, k * (1 - cos) - s3 * sin], -1),
        torch.stack([k * (1 - cos) - s3 * sin, k * (1 - cos) + s3 * sin, cos + (1 - cos) * k], -1),
    ], -2)
    x = torch.einsum("nij,njhw->nihw", rot, x)
    grey = (r(n, 1, 1, 1) < 0.2).float()
    x = grey * x.mean(1, keepdim=True).expand_as(x) + (1 - grey) * x
    return x.clamp(0, 1)


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, over the classes each field annotates (mask N x C)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    m = mask[:, :, None, None]
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos * m
    neg_loss = -torch.log(1 - p) * p ** 2 * (1 - heat) ** 4 * (1 - pos) * m
    n_pos = (pos * m).sum().clamp(min=1)
    return (pos_loss.sum() + neg_loss.sum()) / n_pos


def size_loss(pred: torch.Tensor, wh: torch.Tensor, centres: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 on log width and height at the true centres of the annotated classes."""
    m = (centres * mask[:, :, None, None]).repeat_interleave(2, 1)
    return (F.l1_loss(pred.float(), wh, reduction="none") * m).sum() / m.sum().clamp(min=1)


def predict_fields(model: CellDetector, fields: list[BoxField], input_size: int, threshold: float = 0.05
                   ) -> list[list[tuple]]:
    """Detections (class, score, x0, y0, x1, y1 in the original pixels) for each field."""
    model.eval()
    out = []
    with torch.no_grad():
        for f in fields:
            img, scale, _ = decode_field(f.path, input_size)
            x = field_batch([img])
            heat, sizes = model(x)
            out.extend(decode(heat, sizes, threshold, scale=scale))
    return out


def score_detections(fields: list[BoxField], dets: list[list[tuple]], classes: list[str],
                     annotated: list[str], thresholds: dict[str, float] | None = None) -> dict:
    """Per class: AP50, and precision / recall / F1 at the class's threshold (or the best F1's), at
    IoU 0.5 and (found_precision, found_recall) by centres (metrics.centres_inside)."""
    out = {}
    for k, c in enumerate(classes):
        if c not in annotated:
            continue
        per = []
        for f, d in zip(fields, dets, strict=True):
            mine = [r for r in d if r[0] == k]
            per.append((np.array([r[2:] for r in mine], np.float64).reshape(-1, 4),
                        np.array([r[1] for r in mine]), f.boxes[[i for i, lab in enumerate(f.labels) if lab == c]]))
        t = thresholds[c] if thresholds and c in thresholds else best_threshold(per)
        out[c] = detection_scores(per, t)
        # the same cell found, whatever extent the box was drawn to (another lab's annotators draw
        # white cells with or without their pale cytoplasm): what a count needs
        found = detection_scores(per, t, criterion="centre")
        # a cell cut by the field's edge is not typed in a differential (nor by an analyser): the
        # recall of the whole cells, those whose box keeps 2 px from every edge
        whole = [(b, sc, tr[_inside(tr, f.width, f.height)]) for (b, sc, tr), f in zip(per, fields, strict=True)]
        w = detection_scores(whole, t, criterion="centre")
        out[c].update(found_precision=found["precision"], found_recall=found["recall"],
                      whole_recall=w["recall"], whole_true=w["true"])
    return out


def _inside(boxes: np.ndarray, width: int, height: int, margin: float = 2.0) -> np.ndarray:
    """Which boxes keep ``margin`` pixels from every edge of a width x height field."""
    return ((boxes[:, 0] > margin) & (boxes[:, 1] > margin) & (boxes[:, 2] < width - margin)
            & (boxes[:, 3] < height - margin))


def train_detector(sources: list[str], out: str | Path, cfg: DetectConfig = DetectConfig(), *,
                   log=print, progress: bool = True) -> dict:
    """Train a detector on the train splits of ``sources``; choose thresholds on their val splits."""
    cfg.check()
    out = Path(out)
    check_out_dir(out)
    sets = load_sources(sources, cfg.seed)
    classes = class_order({c for bs in sets for c in bs.classes})
    if "wbc" not in classes:
        raise BloodcellError("no source annotates white cells (a class named WBC or white blood cell)")
    threads = set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out, "detector training"):
        t0 = time.perf_counter()
        train = [x for bs in sets for x in _load(bs.split("train"), classes, bs.classes,
                                                 int(cfg.input_size * KEEP_SCALE))]
        if not train:
            raise BloodcellError("no training fields: every source's train split is empty")
        log(f"detector: {len(train)} training fields from {len(sets)} source(s); classes {', '.join(classes)}; "
            f"{threads} threads")
        model = CellDetector(len(classes), cfg.width).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.1)
        history = []
        bar = progress_bar(steps, "detector", progress)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = rng.permutation(len(train))
            totals = np.zeros(2)
            for b in range(0, len(order), cfg.batch_size):
                check_stop()
                batch = [_sample(train[i], cfg.input_size, rng, cfg) for i in order[b:b + cfg.batch_size]]
                imgs = np.stack([im for im, _, _ in batch])
                tg = [targets(bx, lb, len(classes), cfg.input_size) for _, bx, lb in batch]
                heat = torch.from_numpy(np.stack([t[0] for t in tg]))
                wh = torch.from_numpy(np.stack([t[1] for t in tg]))
                centres = torch.from_numpy(np.stack([t[2] for t in tg]))
                mask = torch.from_numpy(np.stack([train[i].annotated for i in order[b:b + cfg.batch_size]])).float()
                x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)
                x = normalise(colour_jitter(x, gen))
                logits, sizes = model(x)
                lh, ls = focal_loss(logits, heat, mask), size_loss(sizes, wh, centres, mask)
                loss = lh + ls
                if not torch.isfinite(loss):
                    raise BloodcellError(f"detector training diverged at epoch {epoch} (loss {loss.item()}); "
                                         "lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                sched.step()
                totals += [lh.item() * len(batch), ls.item() * len(batch)]
                bar.update(1)
            history.append({"epoch": epoch, "heat_loss": totals[0] / len(train), "size_loss": totals[1] / len(train),
                            "seconds": round(time.perf_counter() - t0, 1)})
            if epoch == 1 or epoch % 10 == 0 or epoch == cfg.epochs:
                log(f"epoch {epoch:3d}  heat {history[-1]['heat_loss']:.3f}  size {history[-1]['size_loss']:.3f}  "
                    f"{history[-1]['seconds']:.0f}s")
        bar.close()
        val = [(bs, bs.split("val")) for bs in sets]
        val_fields = [f for _, fs in val for f in fs]
        dets = predict_fields(model, val_fields, cfg.input_size)
        annotated_any = classes
        thresholds = {}
        metrics = {"val": {}, "val_per_source": {}}
        if val_fields:
            # the threshold per class: best F1 over every training source's val fields that annotate it
            for c in annotated_any:
                fs = [(f, d) for (bs, _), f, d in _with_sets(val, dets) if c in bs.classes]
                if fs:
                    s = score_detections([f for f, _ in fs], [d for _, d in fs], classes, [c])
                    thresholds[c] = s[c]["threshold"]
                    metrics["val"][c] = s[c]
            for bs, fs in val:
                if fs:
                    mine = [d for (b, _), _, d in _with_sets(val, dets) if b is bs]
                    metrics["val_per_source"][bs.root] = score_detections(fs, mine, classes, bs.classes, thresholds)
        thresholds = {c: thresholds.get(c, 0.3) for c in classes}
        model.eval()
        ckpt = {"format": FORMAT, "classes": classes, "input_size": cfg.input_size, "width": cfg.width,
                "thresholds": thresholds, "mean": list(MEAN), "std": list(STD),
                "sources": [{"root": bs.root, "layout": bs.layout, "classes": bs.classes,
                             "fields": {s: len(bs.split(s)) for s in ("train", "val", "test")}} for bs in sets],
                "config": asdict(cfg), "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write(out / "detector.pt", buf.getvalue())
        write_yaml(out / "config.yaml", {**asdict(cfg), "sources": list(sources)})
        write_csv(out / "history.csv", history)
        result = {"classes": classes, "thresholds": thresholds, "metrics": metrics,
                  "seconds": round(time.perf_counter() - t0, 1), "train_fields": len(train)}
        write_json(out / "metrics.json", result)
        for c, m in metrics["val"].items():
            log(f"val {c}: AP50 {_f(m['ap50'])}  precision {_f(m['precision'])}  recall {_f(m['recall'])} "
                f"at {m['threshold']:.2f}")
        return result


def _with_sets(val, dets):
    """(set, fields) of each val field, the field, and its detections, in the order predicted."""
    i = 0
    for bs, fs in val:
        for f in fs:
            yield (bs, fs), f, dets[i]
            i += 1


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
