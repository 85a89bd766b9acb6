"""Reward-model training stage."""


def run(cfg):
    """Train a reward model; returns the artifacts it produced ({"nemo": path, ...})."""
    raise NotImplementedError(
        "the rm stage is not implemented yet (issue 6); stage=prep and dry_run=true work today"
    )
