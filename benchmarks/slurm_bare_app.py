"""The reference for benchmarks/slurm_submit.py: a bare Hydra app swept with hydra-submitit-launcher."""
import hydra


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg):
    return cfg.lr


if __name__ == "__main__":
    main()
