"""What every training stage shares, below the stages: stage packages import engine; engine imports
no stage, not the launcher and not modeling.

    loop          the training loop and its task protocol (start here: the docstring is the contract)
    config        the shared config dataclasses, `typed` (the one config -> dataclass converter),
                  `tokenizer_source` (the one tokenizer precedence)
    optim         AdamW and the schedules from OptimConfig; schedule: their closed forms (torch-free)
    checkpointing checkpoints (weights_only loads, top-k, index.json); resume: the identity rule
    preemption    SIGUSR1/SIGTERM -> checkpoint -> exit 75 (torch-free)
    precision     "32" / "bf16" / "16-mixed" ... as PTL means them (torch-free)
    distributed   torch.distributed setup and collectives, DDP/FSDP wrapping, gradient averaging
    metrics, progress, profiling, io (atomic writes with the umask's permissions)

Torch-free modules (schedule, config, preemption, precision, io) are what the launcher may import to
check a run before anything runs.
"""
