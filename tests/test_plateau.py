"""The plateau rule of the downstream tests: the lr is cut when the loss stops falling, training
stops at the plateau after the last cut (or at the cap), and a resumed run decides the same."""
import json

import pytest

from evaluation.plateau import PlateauRule
from evaluation.segmenter_train import SegmenterTrainConfig, train_segmenter
from test_eval_segmenter import TINY, StripesSource


def feed(rule, losses):
    state = rule.start()
    for step, loss in enumerate(losses, 1):
        rule.update(state, step, loss)
        if state["stopped"]:
            return state, step
    return state, len(losses)


def test_a_falling_loss_runs_to_the_cap_and_a_flat_one_stops_after_its_lr_cuts():
    rule = PlateauRule(window=10, min_improvement=0.02, lr_drops=2, max_steps=200)
    state, steps = feed(rule, [0.99 ** i for i in range(300)])  # 10% lower every window: never a plateau
    assert (state["stopped"], steps, state["drops"]) == ("max_steps", 200, 0)
    state, steps = feed(rule, [1.0] * 300)  # flat: a plateau at every check after the first
    assert (state["stopped"], steps, state["drop_steps"]) == ("plateau", 40, [20, 30])
    assert state["lr_scale"] == pytest.approx(0.09)
    with pytest.raises(ValueError, match="plateau rule"):
        PlateauRule(window=1)


def test_training_until_the_plateau_resumes_to_the_same_decision(tmp_path):
    cfg = SegmenterTrainConfig(batch_size=4, warmup_steps=2, until_plateau=True, plateau_window=4,
                               plateau_min_improvement=0.5, plateau_lr_drops=1, max_steps=40, checkpoint_every=3)
    whole = train_segmenter(StripesSource(), tmp_path / "whole", cfg, model_config=TINY, log=lambda _: None)
    rec = whole.training_record
    assert rec["stopped"] == "plateau" and rec["steps"] < 40 and len(rec["plateau_lr_drops_at"]) == 1
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(cfg.lr * 0.3)  # constant after warm-up, cut once
    # Stopped part-way (a checkpoint at step 6), then resumed: the same steps, the same weights.
    part = SegmenterTrainConfig(**{**cfg.__dict__, "max_steps": 6})
    train_segmenter(StripesSource(), tmp_path / "part", part, model_config=TINY, log=lambda _: None)
    import torch

    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    state["train_config"] = cfg.__dict__  # the same run, stopped by a crash rather than by its cap
    state["plateau"]["stopped"] = ""
    torch.save(state, tmp_path / "part" / "checkpoint.pt")
    resumed = train_segmenter(StripesSource(), tmp_path / "part", cfg, model_config=TINY, log=lambda _: None)
    assert resumed.training_record == rec
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))


def test_a_higher_cap_continues_a_capped_run_to_the_bytes_of_one_run(tmp_path):
    import torch

    cfg = SegmenterTrainConfig(batch_size=4, warmup_steps=2, until_plateau=True, plateau_window=4,
                               plateau_min_improvement=0.0, plateau_lr_drops=1, max_steps=12, checkpoint_every=5)
    whole = train_segmenter(StripesSource(), tmp_path / "whole", cfg, model_config=TINY, log=lambda _: None)
    low = SegmenterTrainConfig(**{**cfg.__dict__, "max_steps": 7})
    capped = train_segmenter(StripesSource(), tmp_path / "run", low, model_config=TINY, log=lambda _: None)
    assert capped.training_record["stopped"] == "max_steps" and capped.training_record["steps"] == 7
    raised = train_segmenter(StripesSource(), tmp_path / "run", cfg, model_config=TINY, log=lambda _: None)
    assert raised.training_record == whole.training_record
    assert all(torch.equal(a, b) for a, b in zip(raised.state_dict().values(), whole.state_dict().values()))
    # anything else that differs, or a cap below the steps done, still refuses the checkpoint
    for other in ({"max_steps": 5}, {"lr": 1.0}):
        with pytest.raises(ValueError, match="different training config"):
            train_segmenter(StripesSource(), tmp_path / "run", SegmenterTrainConfig(**{**cfg.__dict__, **other}),
                            model_config=TINY, log=lambda _: None)


def test_fixed_steps_still_run_exactly_their_steps(tmp_path):
    cfg = SegmenterTrainConfig(steps=5, batch_size=4, warmup_steps=2, checkpoint_every=2)
    model = train_segmenter(StripesSource(), tmp_path, cfg, model_config=TINY, log=lambda _: None)
    assert model.training_record == {"steps": 5, "stopped": "steps", "plateau_lr_drops_at": [], "final_ema_loss": None}


class _Repainted:
    """StripesSource with another road colour: same size, same labels, other images."""

    size = StripesSource.size

    def __getitem__(self, i):
        img, label = StripesSource()[i]
        return img.copy() + 1, label


def test_a_checkpoint_is_never_resumed_on_other_data(tmp_path):
    import torch

    cfg = SegmenterTrainConfig(batch_size=4, warmup_steps=2, until_plateau=True, plateau_window=4,
                               plateau_min_improvement=0.0, plateau_lr_drops=1, max_steps=12, checkpoint_every=5)
    low = SegmenterTrainConfig(**{**cfg.__dict__, "max_steps": 5})
    train_segmenter(StripesSource(), tmp_path / "run", low, model_config=TINY, log=lambda _: None)
    with pytest.raises(ValueError, match="trained on other data"):
        train_segmenter(_Repainted(), tmp_path / "run", cfg, model_config=TINY, log=lambda _: None)
    # the same data go on; a checkpoint from before fingerprints goes on unchecked, and says so
    said = []
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    del state["data_fingerprint"]
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    model = train_segmenter(_Repainted(), tmp_path / "run", cfg, model_config=TINY, log=said.append)
    assert model.training_record["steps"] > 5 and any("resumed unchecked" in line for line in said)
