"""Studies built of many trainings: several models under one protocol (``compare``), K folds
(``kfold``), leave one lab out with the label curve (``lab_out``), and a model fitted to a new
lab's images with no label (``adapt``)."""
