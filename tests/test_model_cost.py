"""Matching cost: orientation, sampling, instance granularity and explicit mappings."""
import numpy as np
import pytest
import torch

from amadapter.cost import CostSpec, resample_ids

SKY, ROAD, BUILDING, CAR = 23, 7, 11, 26


def test_orientation_rows_are_target_columns_are_exemplar():
    target = np.array([[SKY, ROAD]], np.uint8)  # 1x2 grid
    exemplar = np.array([[ROAD, ROAD, SKY]], np.uint8)  # 1x3 grid
    c = CostSpec([target], exemplar).cost((1, 2), (1, 3))
    assert c.shape == (1, 2, 3)
    expected = torch.tensor([[0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    assert torch.equal(c[0], expected)


def test_unlabeled_matches_nothing():
    target = np.array([[0, ROAD]], np.uint8)
    exemplar = np.array([[0, ROAD]], np.uint8)
    c = CostSpec([target], exemplar).cost((1, 2), (1, 2))[0]
    assert torch.equal(c, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_majority_keeps_what_nearest_drops_and_nearest_takes_centres():
    lab = np.full((4, 4), ROAD, np.uint8)
    lab[0:2, 0:2] = [[CAR, CAR], [CAR, SKY]]  # top-left block: CAR is the majority
    maj = resample_ids(lab, (2, 2), "majority")
    assert maj[0, 0] == CAR and (maj.ravel()[1:] == ROAD).all()
    near = resample_ids(lab, (2, 2), "nearest")  # centre pixel of block (0,0) is (1,1) -> SKY
    assert near[0, 0] == SKY
    # non-integer ratios work and keep the size asked for
    assert resample_ids(np.zeros((10, 7), np.uint8), (3, 3)).shape == (3, 3)
    with pytest.raises(ValueError, match="unknown label sampling"):
        resample_ids(lab, (2, 2), "bilinear")


def test_batch_of_targets_against_one_exemplar():
    t1 = np.array([[SKY, SKY]], np.uint8)
    t2 = np.array([[ROAD, SKY]], np.uint8)
    c = CostSpec([t1, t2], np.array([[SKY, ROAD]], np.uint8)).cost((1, 2), (1, 2))
    assert c.shape == (2, 2, 2)
    assert torch.equal(c[1], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def _instance_pair():
    # target: road | car 26000 | car 26001 ; exemplar: car 26000 | car 26001 | car 26002 | road
    t_inst = np.array([[ROAD, 26000, 26001]], np.int32)
    e_inst = np.array([[26000, 26001, 26002, ROAD]], np.int32)
    t_lab = np.array([[ROAD, CAR, CAR]], np.uint8)
    e_lab = np.array([[CAR, CAR, CAR, ROAD]], np.uint8)
    return t_lab, t_inst, e_lab, e_inst


def test_instance_granularity_matches_instance_ids():
    t_lab, t_inst, e_lab, e_inst = _instance_pair()
    c = CostSpec([t_lab], e_lab, target_instances=[t_inst], exemplar_instance=e_inst,
                 granularity="instance").cost((1, 3), (1, 4))[0]
    assert torch.equal(c, torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.float32))


def test_instance_mapping_selects_exactly_the_mapped_instances():
    t_lab, t_inst, e_lab, e_inst = _instance_pair()
    # exemplar car 26002 -> target car 26000; exemplar cars 26000 and 26001 -> target car 26001 (M-to-1)
    mapping = {26002: [26000], 26000: [26001], 26001: [26001]}
    c = CostSpec([t_lab], e_lab, target_instances=[t_inst], exemplar_instance=e_inst,
                 instance_mapping=mapping).cost((1, 3), (1, 4))[0]
    expected = torch.tensor([
        [0, 0, 0, 1],  # road: class level
        [0, 0, 1, 0],  # target car 26000 <- exemplar car 26002 only
        [1, 1, 0, 0],  # target car 26001 <- exemplar cars 26000, 26001
    ], dtype=torch.float32)
    assert torch.equal(c, expected)
    # one exemplar instance to several targets (1-to-N)
    c2 = CostSpec([t_lab], e_lab, target_instances=[t_inst], exemplar_instance=e_inst,
                  instance_mapping={26001: [26000, 26001]}).cost((1, 3), (1, 4))[0]
    assert torch.equal(c2[1:], torch.tensor([[0, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.float32))


def test_instance_modes_need_instance_maps():
    with pytest.raises(ValueError, match="need exemplar_instance and target_instances"):
        CostSpec([np.zeros((2, 2), np.uint8)], np.zeros((2, 2), np.uint8), granularity="instance")
    with pytest.raises(ValueError, match="unknown granularity"):
        CostSpec([np.zeros((2, 2), np.uint8)], np.zeros((2, 2), np.uint8), granularity="pixel")


def test_pairs_of_targets_and_exemplars():
    t = [np.array([[SKY, ROAD]], np.uint8)] * 2
    e = [np.array([[SKY, SKY]], np.uint8), np.array([[ROAD, ROAD]], np.uint8)]
    c = CostSpec(t, e).cost((1, 2), (1, 2))
    assert torch.equal(c[0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(c[1], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="3 exemplar maps for 2 targets"):
        CostSpec(t, e + e[:1])
