"""Test-only stage behaviours for the Slurm tests, switched on inside a job by the environment
(`+cluster.env.PYTHONPATH=tests/slurm/hooks +cluster.env.KIT_TEST_HOOK=<mode>:<stage>`).

The real stages are too quick (prep) or too slow (rm on a CPU) to show what the launcher does around
them; these wrap the stage entry the runner calls, leaving the runner, the manifest and Slurm real:
  slow        sleep 120 s on the first attempt, no signal handler of its own (like prep), then the real stage
  checkpoint  a training loop with its own SIGUSR1/SIGTERM handler: saves a checkpoint, exits 75;
              on the next attempt it resumes from the checkpoint and finishes, then the real stage
  slowval     the real stage (rm), whose validations on the first attempt take 2 s per micro-batch (a
              validation longer than Slurm's KillWait); the loop's own stop polls are kept
  die         SIGKILL itself: the job ends without the stage recording anything
  rank1fails  instead of the stage: rank 1 exits 3, the other ranks wait (to be stopped by the launcher)
  exitcrash   instead of the stage: write a result, then rank 1 aborts in the interpreter's teardown
              (an atexit handler; what a library's destructor crashing at exit does)
  probe       instead of the stage: check the GPUs and torch.distributed it was given, write probe_<rank>.json
"""
import os

_HOOK = os.environ.get("KIT_TEST_HOOK")
if _HOOK:
    import json
    import signal
    import sys
    import time

    import launcher.stages as _stages

    _mode, _, _stage = _HOOK.partition(":")
    _real_entry = _stages.Stage.entry

    def _say(msg):
        print(f"[hook {_mode}] {msg}", flush=True)

    def _wrap(real):
        def run(cfg):
            out = cfg.run.stage_dir
            attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            _say(f"attempt {attempt}")
            if _mode == "slow" and attempt == 0:
                for _ in range(1200):
                    time.sleep(0.1)
            elif _mode == "checkpoint":
                ckpt = os.path.join(out, "hook_checkpoint.json")
                step = json.load(open(ckpt))["step"] if os.path.exists(ckpt) else 0
                if step:
                    _say(f"resumed from step {step}")
                else:
                    def save_and_exit(signum, frame):
                        os.makedirs(out, exist_ok=True)
                        with open(ckpt, "w") as f:
                            json.dump({"step": state["step"]}, f)
                        _say(f"{signal.Signals(signum).name}: saved a checkpoint at step {state['step']}")
                        raise SystemExit(75)

                    state = {"step": 0}
                    signal.signal(signal.SIGUSR1, save_and_exit)
                    signal.signal(signal.SIGTERM, save_and_exit)
                    for state["step"] in range(1, 3000):
                        time.sleep(0.1)
            elif _mode == "slowval" and attempt == 0:
                import rm_training.trainer as _trainer

                _evaluate = _trainer.RMTrainer.evaluate

                def evaluate(self, ds, limit=1.0, should_stop=None):
                    if should_stop is not None:  # a validation (the test split is evaluated without one)
                        poll = should_stop

                        def should_stop():
                            time.sleep(2.0)
                            return poll()
                    return _evaluate(self, ds, limit, should_stop)

                _trainer.RMTrainer.evaluate = evaluate
                _say("validations take 2 s per micro-batch")
            elif _mode == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            elif _mode == "rank1fails":
                if int(os.environ.get("RANK", "0")) == 1:
                    _say("rank 1 fails here")
                    raise SystemExit(3)
                time.sleep(120)
            elif _mode == "exitcrash":
                import atexit

                if int(os.environ.get("RANK", "0")) == 1:
                    atexit.register(lambda: os.kill(os.getpid(), signal.SIGABRT))
                path = os.path.join(out, "result.txt")
                os.makedirs(out, exist_ok=True)
                with open(path, "w") as f:
                    f.write("done\n")
                return {"nemo": path}
            elif _mode == "probe":
                import torch.distributed as dist

                t = __import__("torch").ones(1)
                if dist.is_initialized():
                    dist.all_reduce(t)
                rank = int(os.environ.get("RANK", "0"))
                path = os.path.join(out, f"probe_{rank}.json")
                os.makedirs(out, exist_ok=True)
                with open(path, "w") as f:
                    json.dump({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                               "CUDA_VISIBLE_DEVICES", "SLURM_NTASKS", "SLURM_JOB_GPUS")} | {"sum": t.item()}, f)
                return {"nemo": path}
            return real(cfg)

        return run

    def _entry(self):
        if self.name != _stage:
            return _real_entry(self)
        return _wrap(None if _mode in ("probe", "rank1fails", "exitcrash") else _real_entry(self))

    _stages.Stage.entry = _entry
    sys.modules[__name__].__doc__ = __doc__
