"""The colour gate: a model that reads colour and one that reads grey levels, joined into one
(``ColourGate``) that gives each image to the colour model where its colours look like those of a
lab the models trained on, and to the grey-level model elsewhere.

Why two: colour tells eosinophils from neutrophils in a lab the model knows, and misleads on a lab
whose stain it never saw; grey levels keep shape and texture, which travel (bench/RESULTS.md,
"Levers for an unseen lab"). The gate reads each image's colour as Reinhard did: the mean and
spread of its l-alpha-beta channels, six numbers. Each training lab's images give a centre and a
covariance of those; an image goes to the colour model when its Mahalanobis distance to the nearest
lab's centre is within the distance that holds ``quantile`` (99 %) of the training images.

``fit_gate(colour, grey, images)`` makes one from two models and the training labs' images;
``load_model`` rebuilds one from a checkpoint whose model is ``NAME`` (``from_kwargs``), so every
command that takes a RUN takes it. Both branches run on every batch (the gate is per image, and
both are small), so the whole is exported to ONNX like any model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bloodcell.catalog import MEAN, STD
from bloodcell.errors import BloodcellError
from bloodcell.models.registry import get_model, lab_moments

NAME = "colourgate"
BRANCHES = ("colour", "grey")
DESCRIPTOR = 6  # l-alpha-beta mean and spread
QUANTILE = 0.99
MIN_IMAGES = 10  # per lab, for a covariance of six numbers
RIDGE = 1e-6


def descriptor(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W RGB in [0, 1] -> N x 6: each image's l-alpha-beta channel means and spreads."""
    _, mean, spread = lab_moments(rgb.float())
    return torch.cat([mean.flatten(1), spread.flatten(1)], 1)


def branch_state(state: dict, stain_norm: str) -> dict:
    """A gated model's weights -> those of the branch that reads as ``stain_norm`` does (``gray``:
    the grey-level one, any other: the colour one), under the branch's own names."""
    branch = "grey." if stain_norm == "gray" else "colour."
    return {k.removeprefix(branch): v for k, v in state.items() if k.startswith(branch)}


class ColourGate(nn.Module):
    """``colour`` for an image whose colours lie near a training lab's, ``grey`` for the others.

    Takes the normalised batch both branches take (catalog MEAN/STD) and returns the logits of the
    branch each image is given to. ``centres`` (labs x 6), ``precisions`` (labs x 6 x 6, inverse
    covariances) and ``threshold`` are buffers, saved with the weights.
    """

    def __init__(self, colour: nn.Module, grey: nn.Module, labs: list[str]):
        super().__init__()
        self.colour, self.grey, self.labs = colour, grey, list(labs)
        n = len(self.labs)
        self.register_buffer("centres", torch.zeros(n, DESCRIPTOR))
        self.register_buffer("precisions", torch.eye(DESCRIPTOR).repeat(n, 1, 1))
        self.register_buffer("threshold", torch.tensor(0.0))

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's squared Mahalanobis distance to the nearest training lab's colours."""
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        return self.nearest(descriptor((x.float() * std + mean).clamp(0, 1)))

    def nearest(self, desc: torch.Tensor) -> torch.Tensor:
        """N x 6 descriptors -> each one's squared Mahalanobis distance to the nearest lab's centre."""
        d = desc[:, None, :] - self.centres[None]  # N x L x 6
        return (torch.matmul(d.unsqueeze(2), self.precisions).squeeze(2) * d).sum(-1).amin(1)

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        """True where an image goes to the colour model."""
        return self.distance(x) <= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use = self.routes(x)[:, None]
        return torch.where(use, self.colour(x).float(), self.grey(x).float())

    def extra_repr(self) -> str:
        return f"labs={self.labs}, threshold={float(self.threshold):.2f}"


def from_kwargs(colour: dict, grey: dict, labs: list[str]) -> ColourGate:
    """The gate a checkpoint names (``model.kwargs``): each branch's registered name and arguments."""
    return ColourGate(get_model(colour["name"], **colour["kwargs"]), get_model(grey["name"], **grey["kwargs"]), labs)


def fit_gate(colour: nn.Module, grey: nn.Module, images: dict[str, np.ndarray],
             quantile: float = QUANTILE) -> tuple[ColourGate, dict]:
    """The gate for two models from each training lab's images as the models see them (uint8
    N x H x W x 3 per lab name); returns it (eval mode) and what it learnt: per lab its images and
    the share of them routed to colour, the threshold and the quantile."""
    if not 0 < quantile <= 1:
        raise BloodcellError(f"gate quantile must be in (0, 1], got {quantile}")
    small = [f"{lab} ({len(a)})" for lab, a in images.items() if len(a) < MIN_IMAGES]
    if not images or small:
        raise BloodcellError(f"the colour gate needs at least {MIN_IMAGES} training images per lab; "
                             f"too few: {', '.join(small) or 'no lab'}")
    gate = ColourGate(colour, grey, list(images))
    descs = {lab: descriptor(torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255)
             for lab, a in images.items()}
    for i, d in enumerate(descs.values()):
        cov = torch.cov(d.T.double()) + RIDGE * torch.eye(DESCRIPTOR, dtype=torch.double)
        gate.centres[i] = d.mean(0)
        gate.precisions[i] = torch.linalg.inv(cov).float()
    dist = {lab: gate.nearest(d) for lab, d in descs.items()}
    gate.threshold.fill_(float(torch.quantile(torch.cat(list(dist.values())), quantile)))
    routed = {lab: {"images": len(d), "to_colour": float((d <= gate.threshold).float().mean())}
              for lab, d in dist.items()}
    return gate.eval(), {"quantile": quantile, "threshold": float(gate.threshold), "labs": routed}
