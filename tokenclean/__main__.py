"""The `tokenclean` command.

  tokenclean                         # fixed-model cleaning of SmolLM2-135M on chatterbot (~5 min on 2 CPU cores)
  tokenclean model=tiny              # the same job on a tiny model built from a config (< 1 min)
  tokenclean pipeline=self_evolving selection.keep_ratio=0.6
  tokenclean -m selection.keep_ratio=0.4,0.6,0.8          # a Hydra sweep, one run directory per point
  accelerate launch --config_file launch/ddp.yaml --num_processes 8 -m tokenclean \
      model=local model.name_or_path=/models/llama
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import tokenclean.config  # noqa: F401  registers the typed schema with Hydra's ConfigStore


def conf_dir() -> str:
    source = Path(__file__).resolve().parent.parent / "conf"     # a source checkout (editable install)
    if (source / "config.yaml").exists():
        return str(source)
    return str(Path(__file__).resolve().parent / "conf")         # a wheel: conf/ ships as tokenclean/conf


def _model_tag(name_or_path: str) -> str:
    return name_or_path.split(":", 1)[1] if name_or_path.startswith("builtin:") else Path(name_or_path).name


def _field_docs(*, _root_) -> str:
    """`tokenclean --help`'s field list with the composed values (the overrides given with --help applied); `$`
    doubled, since Hydra fills the help template with string.Template."""
    def value_of(key):
        try:
            return OmegaConf.select(_root_, key, throw_on_missing=True)
        except OmegaConfBaseException:   # a required field left unset, an interpolation that cannot resolve
            return "???"
    return tokenclean.config.field_docs(value_of).replace("$", "$$")


if not OmegaConf.has_resolver("model_tag"):
    OmegaConf.register_new_resolver("model_tag", _model_tag)
    OmegaConf.register_new_resolver("tokenclean_fields", _field_docs)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


composed = False   # set when Hydra has composed the config and calls app: what fails before is the command line


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def app(cfg: DictConfig) -> None:
    global composed
    composed = True
    from tokenclean import rundir
    from tokenclean.config import UserError

    _setup_logging()
    try:
        typed = typed_config(cfg)
        from tokenclean import pipelines
        hydra_cfg = HydraConfig.get()
        run_dir, command = Path(hydra_cfg.runtime.output_dir), ["tokenclean", *hydra_cfg.overrides.task]
        job, summary = pipelines.run(typed, run_dir, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                                     command)
    except UserError as e:   # every error a user can cause and fix: one line, no traceback
        fail(2, f"error: {e}")
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        fail(1, f"error: {e.filename + ': ' if e.filename else ''}{e.strerror}; {WRITE_ERRORS[e.errno]}. {_where()}")
    except KeyboardInterrupt:
        fail(130, f"interrupted. {_where()}")
    finally:
        rundir.end_run()
    if job.acc.is_main_process:
        print(summary.lines())


def typed_config(cfg: DictConfig):
    """The composed config as the typed `Config`, with every check that needs no model (config.validate, the
    scorer's own): raises a ConfigError (a UserError) naming the override, or returns the config that can run."""
    from tokenclean import scorers
    from tokenclean.config import ConfigError, unknown_keys, validate

    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:   # e.g. an interpolation that does not resolve
        raise ConfigError(composition_error(e)) from None
    extra = unknown_keys(OmegaConf.to_container(cfg), typed)
    if extra:
        raise ConfigError(f"{', '.join(extra)}: not a tokenclean setting (added with +{extra[0]}=...?); "
                          "`tokenclean --cfg job` prints every key with its value")
    validate(typed)
    scorers.validate(typed)
    return typed


# what the OS says when a disk fills or a path cannot be written: one line (the path, the way out), no traceback
PERMISSIONS = "check its permissions (the run directory must be writable: else choose another, hydra.run.dir=...)"
WRITE_ERRORS = {errno.ENOSPC: "free some space there", errno.EDQUOT: "free some space there (disk quota)",
                errno.EACCES: PERMISSIONS, errno.EPERM: PERMISSIONS,
                errno.EROFS: "that filesystem is read-only: choose another run directory (hydra.run.dir=...)"}


def _where() -> str:
    from tokenclean.rundir import RunDir
    return RunDir.active.where() if RunDir.active else "Then run the same command again."


def fail(code: int, message: str) -> None:
    """One line on stderr, no traceback: what is wrong and the way out."""
    print(f"tokenclean: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


HYDRA_NOISE = ("reference_type=", "object_type=", "Config search path", "provider=", "See https://hydra.cc")


def composition_error(e: Exception) -> str:
    """Hydra's or OmegaConf's message for an override that cannot compose, as one line: the override, what is
    wrong and, for a config group, the options (without the key paths and search paths it adds for debugging)."""
    lines = str(e).splitlines() + (str(e.__cause__).splitlines() if e.__cause__ is not None else [])
    kept = [line.strip().replace("full_key: ", "(key ").rstrip() + (")" if "full_key: " in line else "")
            for line in lines if line.strip() and not line.strip().startswith(HYDRA_NOISE)
            and set(line.strip()) != {"^"}] or [type(e).__name__]
    if isinstance(e, OverrideParseException):   # the grammar's own words say nothing about what was typed
        return (f"an override does not parse ({kept[0]}): write key=value, quoting values with spaces or "
                "brackets (https://hydra.cc/docs/advanced/override_grammar/basic)")
    first, rest = kept[0].replace("Error merging override ", ""), " ".join(kept[1:])
    text = f"{first}{'' if not rest or first[-1] in '.:' or rest[0] == '(' else ':'} {rest}".rstrip(" .")
    return f"{text}. `tokenclean --help` lists the config groups; `tokenclean --cfg job` prints every key and value"


def main() -> None:
    try:
        run_app()
    finally:
        close_process_group()


def run_app() -> None:
    # Hydra prints a composition error over several lines and exits 1; with HYDRA_FULL_ERROR it raises instead, so
    # a wrong override is the one-line error (exit 2) that every other user error is. A user who sets it gets
    # Hydra's own full report.
    if os.environ.get("HYDRA_FULL_ERROR"):
        app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except Exception as e:   # Hydra's, OmegaConf's (${...} that does not resolve), a ValueError for `model=0`
        if composed:
            raise
        message, args = composition_error(e), [a for a in sys.argv[1:] if "=" in a]
        where = "" if any(a in message for a in args) else f"in `{' '.join(args)}`: "
        fail(2, f"error: {where}{message}")
    finally:
        del os.environ["HYDRA_FULL_ERROR"]


def close_process_group() -> None:
    """Destroy the process group `accelerate launch` set up, once every run of this process is over (a Hydra sweep
    runs several). Left to interpreter exit, gloo's threads are torn down unjoined and a rank can abort with
    "terminate called without an active exception" after the run has finished (seen in CI)."""
    torch = sys.modules.get("torch")    # not imported: --help, a config error; nothing to close
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
