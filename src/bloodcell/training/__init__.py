"""Training: ``train(cfg)`` into a run folder (``train``), the loop functions (``engine``), scoring a
checkpoint on any data (``evaluate``), experiment trackers (``tracking``), several processes
(``distributed``, the workers' side; ``launch``, the parent's)."""
