"""Loss weights per latent cell from the target's layout (training/layout_weights.py)."""
import pytest
import torch
from diffusers import DDIMScheduler

from amgen_core.labels import NAME_TO_ID
from training.diffusion import prediction_loss
from training.layout_weights import edge_pixels, layout_cell_weights

ROAD, CAR = NAME_TO_ID["road"], NAME_TO_ID["car"]


def _scene():
    label = torch.full((1, 8, 16), ROAD)
    label[0, 0:4, 0:4] = CAR                       # one car in the top-left latent cell
    instance = label.clone()
    instance[0, 0:4, 0:4] = CAR * 1000
    return label, instance


def test_edges_are_the_pixels_next_to_a_change():
    label, instance = _scene()
    edge = edge_pixels(label, instance)[0]
    assert edge[3, 3] and edge[4, 3] and edge[3, 4]    # both sides of the car's border
    assert not edge[1, 1] and not edge[7, 15]           # inside the car, inside the road


def test_thing_cells_weigh_more_and_the_mean_is_one():
    label, instance = _scene()
    w = layout_cell_weights(label, instance, (2, 4), thing_weight=3.0, boundary_weight=0.0)
    assert w.shape == (1, 1, 2, 4)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert w[0, 0, 0, 0] == pytest.approx(4.0 * w[0, 0, 1, 3].item())   # 1 + 3 against 1


def test_no_weights_means_none_and_the_plain_loss():
    label, instance = _scene()
    assert layout_cell_weights(label, instance, (2, 4), 0.0, 0.0) is None
    sched = DDIMScheduler(prediction_type="sample")
    g = torch.Generator().manual_seed(0)
    pred, x0, noise = (torch.randn(2, 3, 2, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 500])
    plain = prediction_loss(pred, x0, noise, t, sched, None)
    torch.testing.assert_close(prediction_loss(pred, x0, noise, t, sched, None, torch.ones(2, 1, 2, 4)), plain)
    heavy_first = torch.zeros(2, 1, 2, 4)
    heavy_first[:, :, 0, 0] = 8.0
    expected = (pred - x0).pow(2)[:, :, 0, 0].mean(1).mean()   # 8 x one cell's error, over 8 cells
    torch.testing.assert_close(prediction_loss(pred, x0, noise, t, sched, None, heavy_first), expected)


def test_a_label_that_does_not_tile_the_latent_is_refused():
    label, instance = _scene()
    with pytest.raises(ValueError, match="do not tile"):
        layout_cell_weights(label, instance, (3, 4), 1.0, 1.0)
