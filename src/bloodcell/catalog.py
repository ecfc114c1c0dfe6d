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
    "breast-histopathology": {
        "description": 'Kaggle "Breast Histopathology Images" (paultimothymooney/'
                       "breast-histopathology-images): 50 x 50 patches of breast cancer whole-slide "
                       "images, invasive ductal carcinoma or not",
        # folder name -> class name, in the order of the class indices: the positive class (IDC) last
        "classes": {"0": "no IDC", "1": "IDC"},
        "nested_folder": "IDC_regular_ps50_idx5",  # the release's second copy of the patient folders
        "patch_size": 50,
        "full_set": {"patches": 277_524, "patients": 279, "positive_share": 0.28},
        # patient-level split of the full set (Cruz-Roa et al. 2014; Janowczyk and Madabhushi 2016)
        "reported": {"f1_positive": (0.72, 0.76), "balanced_accuracy": 0.84},
        "url": "https://www.kaggle.com/datasets/paultimothymooney/breast-histopathology-images",
    },
    "synthetic": {
        "description": "bloodcell's built-in procedurally generated blood smears (no files needed)",
        "classes": SYNTHETIC_CLASSES,
    },
}

# MedMNIST v2/v3 2D sets (the medmnist package's INFO, medmnist 3.0.2): what bloodcell reads from a
# <flag>[_<size>].npz when the package is not installed. Label names in the order of the label index.
MEDMNIST_SIZES = (28, 64, 128, 224)
MEDMNIST = {
    "pathmnist": {"task": "multi-class", "n_channels": 3,
        "n_samples": {"train": 89996, "val": 10004, "test": 7180},
        "label": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium")},
    "chestmnist": {"task": "multi-label, binary-class", "n_channels": 1,
        "n_samples": {"train": 78468, "val": 11219, "test": 22433},
        "label": ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                  "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                  "pleural", "hernia")},
    "dermamnist": {"task": "multi-class", "n_channels": 3,
        "n_samples": {"train": 7007, "val": 1003, "test": 2005},
        "label": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                  "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                  "melanocytic nevi", "vascular lesions")},
    "octmnist": {"task": "multi-class", "n_channels": 1,
        "n_samples": {"train": 97477, "val": 10832, "test": 1000},
        "label": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal")},
    "pneumoniamnist": {"task": "binary-class", "n_channels": 1,
        "n_samples": {"train": 4708, "val": 524, "test": 624},
        "label": ("normal", "pneumonia")},
    "retinamnist": {"task": "ordinal-regression", "n_channels": 3,
        "n_samples": {"train": 1080, "val": 120, "test": 400},
        "label": ("0", "1", "2", "3", "4")},
    "breastmnist": {"task": "binary-class", "n_channels": 1,
        "n_samples": {"train": 546, "val": 78, "test": 156},
        "label": ("malignant", "normal, benign")},
    "bloodmnist": {"task": "multi-class", "n_channels": 3,
        "n_samples": {"train": 11959, "val": 1712, "test": 3421},
        "label": ("basophil", "eosinophil", "erythroblast",
                  "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                  "lymphocyte", "monocyte", "neutrophil", "platelet")},
    "tissuemnist": {"task": "multi-class", "n_channels": 1,
        "n_samples": {"train": 165466, "val": 23640, "test": 47280},
        "label": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                  "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                  "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb")},
    "organamnist": {"task": "multi-class", "n_channels": 1,
        "n_samples": {"train": 34561, "val": 6491, "test": 17778},
        "label": ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                  "liver", "lung-left", "lung-right", "pancreas", "spleen")},
    "organcmnist": {"task": "multi-class", "n_channels": 1,
        "n_samples": {"train": 12975, "val": 2392, "test": 8216},
        "label": ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                  "liver", "lung-left", "lung-right", "pancreas", "spleen")},
    "organsmnist": {"task": "multi-class", "n_channels": 1,
        "n_samples": {"train": 13932, "val": 2452, "test": 8827},
        "label": ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                  "liver", "lung-left", "lung-right", "pancreas", "spleen")},
}

# The study bloodcell started from: its four models and the figures it reported (test split).
STUDY = {
    "cnn2x32": {"label": "Model 1", "accuracy": 0.25, "loss": 1.38},
    "cnn4x64": {"label": "Model 2", "accuracy": 0.67, "loss": 0.70},
    "cnn4x32": {"label": "Model 3", "accuracy": 0.68, "loss": 0.67},
    "vgg3": {"label": "Model 4", "accuracy": 0.25, "loss": None},
}
