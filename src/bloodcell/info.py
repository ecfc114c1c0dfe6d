"""Dataset facts and constants, written once (MedMNIST's INFO table is the model)."""

from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Normalisation constants: ImageNet's, so that local pretrained torchvision weights fit too.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

SYNTHETIC_CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")

INFO = {
    "blood-cells": {
        "description": 'Kaggle "Blood Cell Images" (paultimothymooney/blood-cells), dataset2-master',
        "classes": ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"),
        "splits": {"TRAIN": 9957, "TEST": 2487, "TEST_SIMPLE": 71},
        # distinct K in TRAIN's _K_N names; K is not the source cell (data.groups), so bloodcell groups
        # TRAIN by look-alike copies instead: 82 / 35 / 19 / 122 groups (bench/kaggle_groups.py)
        "train_k_values": {"EOSINOPHIL": 75, "LYMPHOCYTE": 27, "MONOCYTE": 16, "NEUTROPHIL": 159},
        "train_similar_groups": {"EOSINOPHIL": 82, "LYMPHOCYTE": 35, "MONOCYTE": 19, "NEUTROPHIL": 122},
        "image_size": (320, 240),
        "url": "https://www.kaggle.com/datasets/paultimothymooney/blood-cells",
    },
    "pbc": {
        "description": "PBC dataset (Acevedo et al. 2020), 8 classes, CellaVision DM96",
        "classes": (
            "basophil", "eosinophil", "erythroblast", "ig",
            "lymphocyte", "monocyte", "neutrophil", "platelet",
        ),
        "url": "https://data.mendeley.com/datasets/snkd93bnjr/1",
    },
    "synthetic": {
        "description": "bloodcell's built-in procedurally generated blood smears (no files needed)",
        "classes": SYNTHETIC_CLASSES,
    },
}

# The study bloodcell started from: its four models and the figures it reported (test split).
STUDY = {
    "cnn2x32": {"label": "Model 1", "accuracy": 0.25, "loss": 1.38},
    "cnn4x64": {"label": "Model 2", "accuracy": 0.67, "loss": 0.70},
    "cnn4x32": {"label": "Model 3", "accuracy": 0.68, "loss": 0.67},
    "vgg3": {"label": "Model 4", "accuracy": 0.25, "loss": None},
}
