"""PPO math against values worked out by hand (ppo/algorithms.py)."""
from __future__ import annotations

import math

import pytest
import torch

from ppo.algorithms import (AdaptiveKLController, entropy_from_logits, explained_variance, gae, kl_per_token,
                            masked_mean, policy_loss, token_rewards, value_loss, whiten)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_by_hand_with_prompt_and_padding_columns():
    # column 0 is a prompt action, 1..3 the response, 4 padding; values there are garbage
    mask = t([0, 1, 1, 1, 0])
    values = t([7.0, 0.5, 0.2, -0.1, 9.0])
    rewards = t([0.0, 0.0, 0.0, 1.0, 0.0])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.8)
    # t=3: d = 1 + 0.9*0 - (-0.1) = 1.1                  A = 1.1
    # t=2: d = 0 + 0.9*(-0.1) - 0.2 = -0.29              A = -0.29 + 0.72*1.1 = 0.502
    # t=1: d = 0 + 0.9*0.2 - 0.5 = -0.32                 A = -0.32 + 0.72*0.502 = 0.04144
    torch.testing.assert_close(adv, t([0.0, 0.04144, 0.502, 1.1, 0.0]))
    torch.testing.assert_close(ret, t([0.0, 0.54144, 0.702, 1.0, 0.0]))


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    mask = t([1, 1, 1])
    values = t([0.3, -0.2, 0.4])
    rewards = t([-0.1, -0.2, 2.0])
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([1.7, 1.8, 2.0]))  # sum of rewards to go
    torch.testing.assert_close(adv, t([1.4, 2.0, 1.6]))


def test_kl_and_token_rewards_by_hand():
    lp, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -1.0, -3.0])
    torch.testing.assert_close(kl_per_token(lp, ref, use_absolute_kl=False), t([0.5, -1.0, 0.0]))
    kl = kl_per_token(lp, ref, use_absolute_kl=True)
    torch.testing.assert_close(kl, t([0.5, 1.0, 0.0]))
    mask = t([1, 1, 0])  # the last column is padding: the score lands on column 1
    r = token_rewards(torch.tensor([2.0], dtype=torch.float64), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(r, t([-0.05, -0.1 + 2.0, 0.0]))


def test_policy_loss_by_hand():
    old = t([0.0, 0.0, 0.0, 0.0, 0.0])
    lp = t([0.5, -0.5, 0.1, 0.3, 5.0])
    adv = t([1.0, -1.0, 2.0, -0.5, 100.0])
    mask = t([1, 1, 1, 1, 0])  # the last token is masked: its huge values must not count
    loss, stats = policy_loss(lp, old, adv, mask, ratio_eps=0.2)
    per_token = [
        max(-1.0 * math.exp(0.5), -1.0 * 1.2),    # -1.2      (clipped)
        max(1.0 * math.exp(-0.5), 1.0 * 0.8),     # 0.8       (clipped)
        -2.0 * math.exp(0.1),                     # -2.2103   (ratio 1.105 inside the band: both terms equal)
        max(0.5 * math.exp(0.3), 0.5 * 1.2),      # 0.6749    (outside, but the pessimistic side)
    ]
    assert per_token[0] == -1.2 and per_token[1] == 0.8
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-12)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2103418 + 0.6749294) / 4, abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)


def test_policy_gradient_zero_when_clipped():
    lp = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, t([0.0]), t([1.0]), t([1.0]), ratio_eps=0.2)
    loss.backward()
    assert lp.grad.item() == 0.0  # ratio 1.65 > 1.2 with A > 0: no push further


def test_value_loss_by_hand():
    v, old, ret = t([1.0, 0.0, -1.0, 5.0]), t([0.5, 0.1, 0.0, 0.0]), t([1.2, -0.5, 0.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss, stats = value_loss(v, old, ret, mask, clip_val=0.2)
    # t1: clipped 0.7 -> max(0.04, 0.25) = 0.25; t2: clipped 0.0 -> 0.25; t3: clipped -0.2 -> max(1.0, 0.04) = 1.0
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.25 + 1.0) / 3)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)


def test_whiten_masked_mean_explained_variance():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    w = whiten(x, mask)
    torch.testing.assert_close(w, t([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)  # unbiased std of 1,2,3 is 1
    ret = t([1.0, 2.0, 3.0, 0.0])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(4, dtype=torch.float64) + 2.0, ret, mask) == pytest.approx(0.0, abs=1e-6)


def test_entropy_and_adaptive_kl():
    assert entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))
    # beta *= exp(clip(log(KL / target), -0.2, 1) / horizon), horizon in PPO steps
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=4)
    assert ctl.update(12.0) == pytest.approx(0.1 * 2 ** 0.25)  # twice the target: +19% a step
    assert ctl.update(6.0 * math.exp(-0.1)) == pytest.approx(0.1 * 2 ** 0.25 * math.exp(-0.025))  # inside the clip
    before = ctl.value
    assert ctl.update(600.0) == pytest.approx(before * math.exp(0.25))  # log-error clipped at 1
    assert ctl.update(-0.5) == pytest.approx(before * math.exp(0.25 - 0.05))  # KL <= 0: down by the -0.2 clip
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    assert fixed.update(100.0, n=10) == 0.1
