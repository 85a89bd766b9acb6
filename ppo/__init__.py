"""PPO stage."""


def run(cfg):
    """Train a policy with PPO; returns the artifacts it produced ({"nemo": path, ...})."""
    raise NotImplementedError(
        "the ppo stage is not implemented yet (issue 7); stage=prep and dry_run=true work today"
    )
