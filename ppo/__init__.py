"""PPO stage: actor, critic, frozen reference and reward model; rollouts with the KV-cache generator;
NeMo-Aligner's gpt_ppo_actor.yaml / gpt_ppo_critic.yaml keys.

    python launcher/main.py stage=ppo        # or the last stage of stage=all
"""


def run(cfg):
    """Train a policy with PPO; returns the artifacts it produced ({"nemo": path, "metrics": path, ...})."""
    from .stage import run as _run  # torch and the models load only when the stage runs

    return _run(cfg)
