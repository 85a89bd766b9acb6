"""The command line before Hydra composes it: Hydra's own flags, the kit's pre-check of the overrides,
and the kit's reading of `stage=a,b`.

The pre-check (launcher.validate.check_overrides) gives a typo a suggestion instead of Hydra's bare
"not in struct". It sees the command line as Hydra's own argument parser splits it (so `-sc query=bash`,
what Hydra's installed completion script runs on every TAB, is a flag and its override, never a key),
and it knows as config groups whatever Hydra would: the kit's `conf/` and any group the search path
adds (`hydra.searchpath=[...]`, `--config-dir`, a primary config's own `hydra.searchpath`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path
from typing import List, Optional, Sequence

from launcher.errors import ConfigError
from launcher.validate import override_problems, schema

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def hydra_args(argv: Sequence[str]) -> Optional[argparse.Namespace]:
    """argv as Hydra's own parser reads it; None if Hydra will refuse it (and say why itself)."""
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return get_args_parser().parse_args(list(argv))
    except SystemExit:
        return None


def kit_argv(argv: List[str]) -> List[str]:
    """The two readings the kit gives the command line before Hydra sees it:

    - `stage=prep,rm` is the list of stages to run, in every mode (run, -m, hydra.mode=MULTIRUN): the
      stages of one run. Sweeping over stages makes no sense (a point's later stage would find nothing
      prepared), and `stage=choice(rm,ppo)` still says so explicitly.
    - `+experiment=x` (lightning-hydra-template's spelling) is `experiment=x`: conf/config.yaml already
      selects an experiment (quickstart), which Hydra's `+` would refuse to add a second time."""
    out = []
    for a in argv:
        if a.startswith("stage=") and "," in a and "[" not in a and "(" not in a:
            a = f"stage=[{a[6:]}]"
        elif a.startswith("+experiment="):
            a = a[1:]
        out.append(a)
    return out


class GroupLookup:
    """`is_group(name)` for the pre-check: a folder of conf/, or not a top-level key and a group in Hydra's
    repository of the command line's whole search path (built on first need only: it loads the primary config)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._repo = None

    def __call__(self, name: str) -> bool:
        if (CONF_DIR / name).is_dir():
            return True
        if name in schema().keys():  # stage=, dry_run=...: a key, and no search path needed to say so
            return False
        if self._repo is None:
            self._repo = self._repository()
        return bool(self._repo is not False and self._repo.group_exists(name))

    def _repository(self):
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.utils import create_config_search_path
        from hydra.core.config_search_path import SearchPathQuery

        a = self.args
        try:
            conf = CONF_DIR if a.config_path is None else Path(__file__).resolve().parent / a.config_path
            search_path = create_config_search_path(str(conf))
            if a.config_dir is not None:
                search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(a.config_dir)}",
                                    anchor=SearchPathQuery(provider="schema"))
            loader = ConfigLoaderImpl(config_search_path=search_path)
            _, repo = loader._parse_overrides_and_create_caching_repo(a.config_name or "config", list(a.overrides))
            return repo
        except Exception:  # noqa: BLE001 - a search path Hydra refuses: Hydra says why, better than we could
            return False


def precheck(argv: Sequence[str]) -> List[str]:
    """What the command line gets wrong before Hydra composes anything.

    Raises ConfigError, unless the command runs the kit's task once (no -m, --cfg, --help...): then the
    arguments at fault are taken out of `argv` (in place) and their problems returned, for the launcher
    to report together with what validation finds in the rest (every problem at once)."""
    args = hydra_args(argv)
    if args is None or args.shell_completion:  # completion prints completions, never the kit's errors
        return []
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "hydra.run.dir" and value not in (".", ""):
            raise ConfigError(hydra_run_dir_message(value))
    found = override_problems(args.overrides, is_group=GroupLookup(args))
    if not found:
        return []
    once = not (args.multirun or args.cfg or args.help or args.hydra_help or args.info or args.resolve
                or any(o.replace(" ", "").startswith("hydra.mode=") for o in args.overrides))
    if not once:
        raise ConfigError([msg for _, msg in found])
    bad = {arg for arg, _ in found}
    argv[:] = [a for a in argv if a not in bad]
    return [msg for _, msg in found]


def hydra_run_dir_message(value: str) -> str:
    return (f"hydra.run.dir={value}: the kit places a run with run.dir (run.dir={value}); hydra.run.dir "
            "stays '.', so Hydra writes nothing of its own (a sweep's points go to hydra.sweep.dir)")


def run_dir_problems() -> List[str]:
    """hydra.run.dir set by a config file (the command line is refused earlier, by precheck)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    if hc.mode == RunMode.RUN and str(hc.run.dir) not in (".", ""):
        return [hydra_run_dir_message(str(hc.run.dir))]
    return []


def original_cwd() -> Path:
    """Where the command was started: relative run.dir, data.path... are relative to it (also under
    hydra.job.chdir=true, where the job runs in its output folder)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def absolute(path: str) -> Path:
    p = Path(path)
    return (p if p.is_absolute() else original_cwd() / p).resolve()

