"""What a token search samples, and how one sample becomes a trial's two training stages."""

from __future__ import annotations

import pytest

from rayexit.errors import RayexitError
from rayexit.tune.space import load_tune_config


def token_config(space: dict, **tune) -> object:
    return load_tune_config(None, {"lr": 1e-4, "epochs": 2}, {"task": "token", "space": space, **tune})


def test_a_sample_becomes_stage_one_and_self_sampling_settings():
    config = token_config({"lr": [1e-5, 1e-3], "head_lr": 1e-3, "self_sampling_epochs": [0.0, 2.0],
                           "sampling_max_window": [1, 9]})
    assert config.tune.policies == ["tokee", "sentee"]
    first, second = config.token_stages({"lr": 2e-4, "self_sampling_epochs": 1.5, "sampling_max_window": 6})
    assert (first.method, first.lr, first.head_lr, first.epochs) == ("joint", 2e-4, 1e-3, 2)
    assert (second.method, second.epochs, second.lr) == ("self-sampling", 1.5, 2e-4)  # stage 1's rate by default
    assert second.sampling_windows == [1, 3, 5] and second.sampling_max_threshold == 0.4
    _, none = config.token_stages({"lr": 2e-4, "self_sampling_epochs": 0.0, "sampling_max_window": 3})
    assert none is None  # 0 epochs: stage 1 only
    # the default queued first: the train section's lr, one self-sampling epoch, windows up to 7
    assert config.default_point() == {"lr": 1e-4, "self_sampling_epochs": 1.0, "sampling_max_window": 7}


@pytest.mark.parametrize(
    "space, tune, named",
    [
        ({"gamma": [0.1, 0.9]}, {}, "tune.space.gamma"),  # a sentence setting
        ({"sampling_max_window": [1.5, 4]}, {}, "tune.space.sampling_max_window"),
        ({"sampling_max_threshold": [0.0, 0.5]}, {}, "tune.space.sampling_max_threshold"),
        ({"lr": [1e-4, 1e-3]}, {"policies": ["entropy"]}, "tune.policies"),
        ({"lr": [1e-4, 1e-3]}, {"windows": [0, 3]}, "tune.windows"),
        ({"lr": [1e-4, 1e-3]}, {"scheduler": "asha", "trainer": "local"}, "tune.scheduler"),
    ],
)
def test_bad_token_search_settings_are_refused_naming_them(space, tune, named):
    with pytest.raises(RayexitError, match=named.replace(".", r"\.")):
        token_config(space, **tune)


def test_a_sentence_search_is_unchanged():
    config = load_tune_config(None, {}, {})
    assert config.tune.task == "sequence" and config.tune.policies == ["entropy", "maxprob", "patience"]
    assert set(config.tune.space) == {"gamma", "temperature", "lr"}


def candidate(policy: str, speed: float, f1: float, bound: float = 0.0, full: float = 0.9) -> dict:
    return {"policy": policy, "window": 3, "thresholds": 0.1, "validation_full": full,
            "validation": {"f1": f1, "flops_speedup": speed, "drop_bound": bound}}


def test_tokee_choices_are_confirmed_live_and_sentee_ones_are_not():
    from rayexit.tune.token_results import confirmed

    spec = token_config({"lr": [1e-4, 1e-3]}, max_drop=0.01, live_checks=2).tune
    fast, middle, slow = candidate("tokee", 3.0, 0.9), candidate("tokee", 2.5, 0.9), candidate("sentee", 2.0, 0.9)
    too_far = candidate("tokee", 4.0, 0.5, bound=0.3)  # outside the drop on replayed validation already
    asked = []

    def live(c):  # the fastest TOKEE point loses 5 points live; the next one holds
        asked.append(c["validation"]["flops_speedup"])
        return {"drop_bound": 0.05 if c is fast else 0.0}

    pool = [slow, too_far, fast, middle]
    assert confirmed(pool, [], 0.9, spec, live) is middle and asked == [3.0, 2.5]
    assert middle["validation_live"] == {"drop_bound": 0.0}
    asked.clear()
    spec.live_checks = 1  # one live run allowed: after it fails, only an exact (SENTEE) point is taken
    assert confirmed(pool, [], 0.9, spec, live) is slow and asked == [3.0]
    assert confirmed(pool, [], 0.9, spec, None) is fast  # no live check: the replayed rule alone
