"""Quality metrics against toy-town ground truth.

Every function here works on plain numpy arrays (images HxWx3 uint8 RGB, label maps HxW
uint8 Cityscapes ids, instance maps HxW int32 ``id*1000+k``) so that it can be checked on
hand-made cases. Colour differences are CIEDE2000 between *mean* Lab colours of regions:
texture noise averages out and what remains is the colour the region was given.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

from amgen_core.labels import IGNORE_TRAIN_ID, ID_TO_TRAIN_ID, NAME_TO_ID, NUM_TRAIN_IDS, THING_IDS, to_train_ids

# Vehicles: the thing classes from "car" on (car, truck, bus, caravan, trailer, train, motorcycle, bicycle).
VEHICLE_IDS: frozenset[int] = frozenset(i for i in THING_IDS if i >= NAME_TO_ID["car"])

# Regions smaller than this many pixels give a mean colour dominated by edge blur; skip them.
MIN_REGION_PIXELS = 6


class MetricInputError(ValueError):
    """Arrays that do not fit together (shapes, dtypes) for a metric."""


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise MetricInputError(f"{what}: shapes differ, {a.shape} vs {b.shape}")


# ----------------------------------------------------------------------------- segmentation
def confusion_matrix(pred_train_ids: np.ndarray, gt_train_ids: np.ndarray, num_classes: int = NUM_TRAIN_IDS) -> np.ndarray:
    """(num_classes x num_classes) int64 counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth is ignore (255) are dropped. Predictions must be trainIds.
    """
    pred = np.asarray(pred_train_ids).reshape(-1).astype(np.int64)
    gt = np.asarray(gt_train_ids).reshape(-1).astype(np.int64)
    _check_same_shape(pred, gt, "confusion_matrix")
    keep = gt != IGNORE_TRAIN_ID
    gt, pred = gt[keep], pred[keep]
    for name, arr in (("ground truth", gt), ("prediction", pred)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise MetricInputError(f"confusion_matrix: {name} holds train ids outside 0..{num_classes - 1}")
    cm = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for classes absent from both ground truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes that occur (Cityscapes convention: NaN classes skipped)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


class ConfusionAccumulator:
    """Sums confusion matrices over many images: mIoU is computed once, over the pooled counts."""

    def __init__(self, num_classes: int = NUM_TRAIN_IDS):
        self.num_classes = num_classes
        self.cm = np.zeros((num_classes, num_classes), np.int64)

    def add(self, pred_train_ids: np.ndarray, target_label_ids: np.ndarray) -> None:
        """``pred_train_ids`` are trainIds (segmenter output); ``target_label_ids`` Cityscapes ids."""
        self.cm += confusion_matrix(pred_train_ids, to_train_ids(target_label_ids), self.num_classes)

    def miou(self) -> float:
        return mean_iou(self.cm)

    def per_class(self) -> np.ndarray:
        return iou_per_class(self.cm)


# ----------------------------------------------------------------------------- colour
def to_lab(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise MetricInputError(f"expected an HxWx3 uint8 RGB image, got {img.shape} {img.dtype}")
    return rgb2lab(img.astype(np.float64) / 255.0)


def region_means(lab: np.ndarray, regions: np.ndarray, keys) -> dict[int, np.ndarray]:
    """Mean Lab colour of each region ``regions == key`` that has at least MIN_REGION_PIXELS pixels."""
    out = {}
    for key in keys:
        mask = regions == key
        if mask.sum() >= MIN_REGION_PIXELS:
            out[int(key)] = lab[mask].mean(0)
    return out


def delta_e(lab_a: np.ndarray, lab_b: np.ndarray) -> np.ndarray:
    return deltaE_ciede2000(np.asarray(lab_a, np.float64), np.asarray(lab_b, np.float64))


def class_colour_errors(output: np.ndarray, gt: np.ndarray, target_label: np.ndarray, exemplar_label: np.ndarray) -> list[float]:
    """CIEDE2000 between the mean colours of output and ground truth, one value per class.

    Classes counted: evaluated classes (a trainId) present in both the exemplar and the
    target layout, i.e. the ones whose appearance the exemplar defines.
    """
    _check_same_shape(output, gt, "class_colour_errors(output, gt)")
    _check_same_shape(output[..., 0], target_label, "class_colour_errors(output, target_label)")
    shared = set(np.unique(target_label).tolist()) & set(np.unique(exemplar_label).tolist())
    classes = sorted(c for c in shared if ID_TO_TRAIN_ID[c] != IGNORE_TRAIN_ID)
    out_means = region_means(to_lab(output), target_label, classes)
    gt_means = region_means(to_lab(gt), target_label, classes)
    return [float(delta_e(out_means[c], gt_means[c])) for c in classes if c in out_means]


def vehicle_instances(instance: np.ndarray) -> list[int]:
    ids = np.unique(instance)
    return [int(i) for i in ids if i >= 1000 and (i // 1000) in VEHICLE_IDS]


def instance_colour_errors(output: np.ndarray, gt: np.ndarray, target_instance: np.ndarray, only=None) -> list[float]:
    """CIEDE2000 between output and ground truth mean colours, one value per target vehicle instance.

    ``only``: restrict to these instance ids (the benchmark passes the mapped vehicles: the
    ones whose paint the exemplar shows).
    """
    _check_same_shape(output, gt, "instance_colour_errors(output, gt)")
    _check_same_shape(output[..., 0], target_instance, "instance_colour_errors(output, target_instance)")
    keys = [k for k in vehicle_instances(target_instance) if only is None or k in only]
    out_means = region_means(to_lab(output), target_instance, keys)
    gt_means = region_means(to_lab(gt), target_instance, keys)
    return [float(delta_e(out_means[k], gt_means[k])) for k in keys if k in out_means]


def psnr(output: np.ndarray, gt: np.ndarray) -> float:
    """PSNR in dB on 8-bit RGB; +inf for identical images."""
    _check_same_shape(output, gt, "psnr")
    mse = np.mean((np.asarray(output, np.float64) - np.asarray(gt, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


# ----------------------------------------------------------------------------- controllability
@dataclass
class ControlResult:
    hits: int
    total: int

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else float("nan")


def controllability(
    output: np.ndarray,
    target_instance: np.ndarray,
    exemplar_image: np.ndarray,
    exemplar_instance: np.ndarray,
    mapping: dict[int, int],
) -> ControlResult:
    """Does each mapped target vehicle take the colour of the exemplar instance it was mapped to?

    For every target vehicle instance ``t`` in ``mapping`` (value: an exemplar instance
    ``e``), the output's mean colour over ``t`` is compared (CIEDE2000) with the mean
    colour of every exemplar vehicle instance; a hit is when ``e`` is the nearest. A
    target counts only when there are at least two candidates, since with one the
    answer is right by construction.
    """
    _check_same_shape(output[..., 0], target_instance, "controllability(output, target_instance)")
    _check_same_shape(exemplar_image[..., 0], exemplar_instance, "controllability(exemplar_image, exemplar_instance)")
    candidates = region_means(to_lab(exemplar_image), exemplar_instance, vehicle_instances(exemplar_instance))
    if len(candidates) < 2:
        return ControlResult(0, 0)
    cand_ids = list(candidates)
    cand_lab = np.stack([candidates[k] for k in cand_ids])
    targets = [t for t in vehicle_instances(target_instance) if int(mapping.get(t, -1)) in candidates]
    out_means = region_means(to_lab(output), target_instance, targets)
    hits = total = 0
    for t, colour in out_means.items():
        nearest = cand_ids[int(np.argmin(delta_e(np.broadcast_to(colour, cand_lab.shape), cand_lab)))]
        hits += int(nearest == int(mapping[t]))
        total += 1
    return ControlResult(hits, total)
