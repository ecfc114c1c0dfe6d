"""The data layer's Python API: ``load_dataset(path, image_size=64)`` and what it returns.

>>> from bloodcell.data import load_dataset
>>> ds = load_dataset("synthetic", image_size=64)      # or a folder of images
>>> ds.classes, {k: len(s) for k, s in ds.splits.items()}

The modules, one job each: records (the dataclasses), layouts (discover: what is under a path),
groups (look-alike images as one group), splits, images (decoding one file), cache (the decoded
arrays on disk), dataset (load_dataset, join_train), sources (several data sets as one), loader (BatchLoader), synthetic (the built-in
data) and check (``bloodcell data check``).
"""

import importlib

# Where each name lives. Imported on first use (PEP 562), so that ``bloodcell.data.images`` alone (the
# lean ONNX server decodes with it) does not pull in the loaders and, through them, torch.
_HOME = {
    "discover_grouped": "dataset", "join_train": "dataset", "load_dataset": "dataset",
    "problem_lines": "dataset", "take_rows": "dataset", "discover": "layouts", "BatchLoader": "loader",
    "Dataset": "records", "Item": "records", "Problem": "records", "Source": "records", "Split": "records",
    "few_labels": "sources", "join_sources": "sources", "load_sources": "sources", "parse_class_map": "sources",
    "select_classes": "sources", "source_names": "sources", "source_rows": "sources",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'bloodcell.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"bloodcell.data.{_HOME[name]}"), name)


__all__ = ["BatchLoader", "Dataset", "Item", "Problem", "Source", "Split", "discover", "discover_grouped",
           "few_labels", "join_sources", "join_train", "load_dataset", "load_sources", "parse_class_map", "problem_lines",
           "select_classes", "source_names", "source_rows",
           "take_rows"]
