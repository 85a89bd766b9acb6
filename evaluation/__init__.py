"""The eval stage: score a reward model on a preference set of your choice (accuracy with a 95%
bootstrap interval, per subset, mean margin, "the longer response wins" beside it, per-pair rewards).

`run(cfg) -> artifacts`, like every stage; the launcher feeds it prep's test split and rm's `.nemo`.
`python -m evaluation <reward model> <preference file>` runs the same standalone.
"""
from __future__ import annotations

import logging
import os

from evaluation.config import nothing_to_evaluate

log = logging.getLogger(__name__)


def eval_config(section):
    from omegaconf import OmegaConf

    from evaluation.config import EvalConfig

    if isinstance(section, EvalConfig):
        return section
    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.create(section or {})))


def run(cfg) -> dict:
    """Returns {"rm_metrics", "rm_rewards", "rm_plot"} and, with a policy, {"policy_metrics",
    "policy_samples", "policy_plot"} (paths in cfg.run.stage_dir). Ranks other
    than 0 (a multi-GPU allocation) have nothing to do: evaluation runs on one device."""
    from evaluation.reward_eval import evaluate_reward_model

    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    ev = eval_config(cfg.eval)
    pe = ev.policy
    missing = nothing_to_evaluate(ev.rm.enabled, pe.enabled, bool(pe.restore_from_path))
    if missing:
        raise ValueError(missing)
    out = {}
    if ev.rm.enabled:
        out.update(evaluate_reward_model(ev.rm, cfg.run.stage_dir, cfg.data.get("prompt_format", "nemo")))
    if pe.enabled and pe.restore_from_path:
        from evaluation.policy_eval import evaluate_policy

        from omegaconf import OmegaConf

        if pe.end_strings is None:  # the ends the policy was trained with
            ppo_ends = OmegaConf.select(cfg, "ppo.model.ppo.sampling_params.end_strings", default=None)
            pe.end_strings = list(ppo_ends) if ppo_ends is not None else None
        if pe.min_length is None:  # and the minimum length it was trained under
            pe.min_length = int(OmegaConf.select(cfg, "ppo.model.ppo.length_params.min_length", default=0) or 0)
        reference = pe.reference_path or cfg.model.restore_from_path
        if not reference:
            log.warning("policy eval skipped: no reference (eval.policy.reference_path, or model.restore_from_path: "
                        "PPO's initial policy; a random init is not saved)")
        else:
            out.update(evaluate_policy(pe, str(reference), str(ev.rm.restore_from_path), cfg.run.stage_dir))
    return out
