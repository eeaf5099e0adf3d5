"""`fastmsd finetune`: a trained student's image encoder fine-tuned at label fractions, the protocol the
medical VLP papers report next to the linear probe.

The whole encoder plus a new head is trained on 1 %, 10 % and 100 % of the training labels, the epoch with the
best validation score is kept, and the test score is reported as mean and spread over seeds:
- ``classify``: a linear head, BCE, macro AUC over the labels (``classify``);
- ``segment``: a U-Net or DPT decoder, BCE + soft Dice, Dice over the findings' masks (``segment``).
Baselines start from the same architecture at random (``scratch``) or from ImageNet weights (``start``). The
items each (fraction, seed) sees are the linear probe's (``sample_indices``), drawn by the labels
(classification) or by which findings each item's masks show (segmentation), so that every sample holds
items with and without each one; fine-tuning and probe figures are comparable item by item.
"""

from fastmsd.finetune.classify import Split, load_split, train_classifier
from fastmsd.finetune.fit import Settings, Trained
from fastmsd.finetune.protocol import finetune, format_markdown
from fastmsd.finetune.segment import MaskSplit, load_mask_split, train_segmenter
from fastmsd.finetune.start import Start, load_start

__all__ = ["MaskSplit", "Settings", "Split", "Start", "Trained", "finetune", "format_markdown",
           "load_mask_split", "load_split", "load_start", "train_classifier", "train_segmenter"]
