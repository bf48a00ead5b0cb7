"""Published numbers of arXiv 2304.07314 (``paper_facts.md``), drawn as reference markers.

Table 2, validation, all with CRF, in %: (cluster Acc, cluster mIoU, linear Acc, linear mIoU);
None = not reported.
"""

from __future__ import annotations

DATASET_TITLES = {"cocostuff27": "Cocostuff", "cityscapes": "Cityscapes", "potsdam": "Potsdam"}
D_VIT = {"cocostuff27": 768, "cityscapes": 768, "potsdam": 384}
D_STEGO = {"cocostuff27": 90, "cityscapes": 100, "potsdam": 70}
DIM_TICKS = [3, 6, 12, 24, 48, 96, 192, 384, 768]

TABLE2 = {
    "STEGO (original paper)": {
        "cocostuff27": (56.9, 28.2, 76.1, 41.0), "cityscapes": (73.2, 21.0, None, None), "potsdam": (77.0, None, None, None)},
    "STEGO (released checkpoints, re-evaluated)": {
        "cocostuff27": (56.9, 28.2, 76.1, 41.1), "cityscapes": (73.2, 21.0, 89.6, 28.0), "potsdam": (77.0, 62.6, 85.9, 74.8)},
    "DINO (original paper)": {
        "cocostuff27": (30.5, 9.6, 66.8, 29.4), "cityscapes": (None, None, None, None), "potsdam": (None, None, None, None)},
    "DINO (probes retrained on raw DINO tokens)": {
        "cocostuff27": (42.4, 13.0, 75.8, 44.4), "cityscapes": (52.6, 15.2, 91.3, 34.9), "potsdam": (71.3, 54.3, 84.5, 72.8)},
}
COLUMNS = ("cluster/Accuracy", "cluster/mIoU", "linear/Accuracy", "linear/mIoU")
