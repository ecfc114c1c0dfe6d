"""The data layer's Python API: ``load_dataset(path, image_size=64)`` and what it returns.

>>> from bloodcell.data import load_dataset
>>> ds = load_dataset("synthetic", image_size=64)      # or a folder of images
>>> ds.classes, {k: len(s) for k, s in ds.splits.items()}

The modules, one job each: records (the dataclasses), layouts (discover: what is under a path),
groups (look-alike images as one group), splits, images (decoding one file), cache (the decoded
arrays on disk), dataset (load_dataset, join_train), sources (several data sets as one), loader (BatchLoader), synthetic (the built-in
data) and check (``bloodcell data check``).
"""

from bloodcell.data.dataset import (
           discover_grouped,
           join_train,
           load_dataset,
           problem_lines,
           take_rows,
)
from bloodcell.data.layouts import discover
from bloodcell.data.loader import BatchLoader
from bloodcell.data.records import Dataset, Item, Problem, Source, Split
from bloodcell.data.sources import (
           few_labels,
           join_sources,
           load_sources,
           parse_class_map,
           select_classes,
           source_names,
           source_rows,
)

__all__ = ["BatchLoader", "Dataset", "Item", "Problem", "Source", "Split", "discover", "discover_grouped",
           "few_labels", "join_sources", "join_train", "load_dataset", "load_sources", "parse_class_map", "problem_lines",
           "select_classes", "source_names", "source_rows",
           "take_rows"]
