"""The Hydra edge: the only code that touches Hydra and OmegaConf.

configs/ is composed onto app/config/'s dataclasses (registered in Hydra's ConfigStore by
`register_with_hydra`), so an unknown key or a value of the wrong type fails at start-up with the
key's name; `to_config` turns the composed config into a validated `Config`, the plain dataclass
everything below the entrypoints receives. The scripts compose the same config with
`compose_config`; checkpoints and exports carry it as a dict, read back by `config_from_dict`.
`python -m app.train --help` lists every key with its type, default and help text (`config_docs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

from app.config import Config, ConfigError, check_run_location, field_docs

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _sweep_point_dir(overrides: str) -> str:
    """A sweep point's directory name from its overrides (Hydra's override_dirname): one path
    component, readable, unique. Path-valued overrides (the same for every point, usually) are
    left out of the readable part; a hash of the whole string then keeps points apart."""
    readable = ",".join(item for item in overrides.split(",") if os.sep not in item) or "default"
    if readable == overrides and len(readable) <= 100:
        return readable
    return f"{readable[:100]}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


def worker_rank() -> int:
    """This process's rank: torchrun's RANK, else, in a job of Hydra's submitit launcher (whose
    every task composes the config before app.train runs), its task's."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return submitit.JobEnvironment().global_rank
    return 0


def adopt_submitit_tasks() -> None:
    """In a job of Hydra's submitit launcher with several tasks (nodes x tasks_per_node: each task
    one worker), the environment torchrun gives a worker: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT (from the job id)."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Each worker picks cuda:<LOCAL_RANK> itself (app/distributed.py): every device stays visible.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class RunDirectoryRefused(BaseException):
    """A run directory refused while Hydra composes its path (the run_dir resolver), before Hydra
    writes anything there. A BaseException, so that neither OmegaConf nor Hydra wraps it in a
    traceback of theirs on its way to app/train.py's cli(), which says `error` and exits 2."""

    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


def _run_dir(output_root: str, run_name: str) -> str:
    """hydra.run.dir and hydra.sweep.dir (configs/hydra/default.yaml): <output_root>/<run_name>,
    checked first. Hydra writes .hydra/ and opens the log file there before the job starts: a
    run_name of '..' would overwrite another run's files, and a directory that cannot be written
    (read-only, full, immutable) would fail inside Hydra with its traceback."""
    try:
        check_run_location(str(output_root), str(run_name))
        path = os.path.join(str(output_root), str(run_name))
        try:
            _probe_writes(Path(path))
        except OSError as error:
            raise ConfigError(
                f"cannot write the run directory {path} (from output_root and run_name): {error.strerror or error}."
            ) from error
    except ConfigError as error:
        raise RunDirectoryRefused(error) from error
    return path


def _probe_writes(directory: Path) -> None:
    """OSError unless a file of a few KB can be written and synced in `directory` (made if missing):
    an empty file would still be created on a full disk."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".rectrain_write_test_rank{worker_rank()}"
    try:
        with open(probe, "wb") as written:
            written.write(bytes(4096))
            written.flush()
            os.fsync(written.fileno())
    finally:
        if probe.exists():
            probe.unlink()


def _rank0_only(value: str) -> str | None:
    """Every worker composes the config; only rank 0 may write `value` (.hydra/)."""
    return value if worker_rank() == 0 else None


def _show(value: Any) -> str:
    """A value as an override writes it; a long or nested list or map by its length."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or "''"
    if isinstance(value, (list, dict)):
        items = list(value.values()) if isinstance(value, dict) else value
        if len(items) > 8 or any(isinstance(v, (list, dict)) for v in items):
            return f"[{len(value)} entries]" if isinstance(value, list) else f"{{{len(value)} entries}}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


_UNSET = object()


def _composed_value(root, key: str) -> Any:
    """The value of `key` in a composed config (??? where it must be given), or _UNSET."""
    from omegaconf import OmegaConf

    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(root, parent_key) if parent_key else root
    if not OmegaConf.is_dict(parent) or name not in parent.keys():  # noqa: SIM118 (`in` leaves out a ??? value)
        return _UNSET
    if OmegaConf.is_missing(parent, name):
        return "???"
    value = parent[name]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def config_docs(composed=None, width: int = 100) -> str:
    """Every config key as `key: type = default`, then its help text, groups before their keys;
    with a composed config, `(composed: value)` marks each key whose value differs from its default."""

    def wrap(text: str, indent: str, more: str) -> list[str]:
        return textwrap.wrap(
            text, width, initial_indent=indent, subsequent_indent=indent + more, break_on_hyphens=False
        )

    lines = []
    for doc in field_docs():
        indent = "  " * (doc.key.count(".") - doc.key.count("<"))  # entries of a list or map sit under it
        if doc.is_group:
            lines += ["", *wrap(f"{doc.key}: {doc.help}", indent, "  ")]
            continue
        line = f"{indent}{doc.key}: {doc.type} = {_show(doc.default)}"
        if composed is not None and "<" not in doc.key:
            value = _composed_value(composed, doc.key)
            if value is not _UNSET and value != doc.default:
                line += f"  (composed: {_show(value)})"
        lines.append(line)
        lines += wrap(doc.help, indent + "    ", "")
    return "\n".join(lines).strip("\n")


def _config_docs_resolver(*, _root_) -> str:
    """${config_docs:} in hydra/default.yaml's help template. Hydra then fills the template with
    string.Template, to which `$` is special: it is doubled."""
    return config_docs(_root_).replace("$", "$$")


def register_with_hydra() -> None:
    """Register what configs/ needs: `config_schema`, which train.yaml names first (it types every
    group, so each group's YAML files merge onto their dataclass), and the resolvers
    hydra/default.yaml uses. The group schemas are not registered as options of their groups:
    they would show in --help and be selectable (model=schema)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    OmegaConf.register_new_resolver("rank0_only", _rank0_only, replace=True)
    OmegaConf.register_new_resolver("worker_rank", worker_rank, replace=True)
    OmegaConf.register_new_resolver("sweep_point_dir", _sweep_point_dir, replace=True)
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("config_docs", _config_docs_resolver, replace=True)


def compose_config(overrides: list[str], validate: bool = True) -> Config:
    """The Config that `python -m app.train <overrides>` runs: for the scripts, which compose it
    with Hydra's compose API instead of @hydra.main. Every way the overrides can be wrong (a key
    the schema lacks, an unknown group option, a value of the wrong type, and, unless `validate`
    is false, an impossible value) is a ConfigError naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_override_keys(list(overrides))
    register_with_hydra()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
            return to_config(compose("train", overrides=list(overrides)), validate)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(" ".join(str(error).split())) from error


def to_config(cfg, validate: bool = True) -> Config:
    """The composed Hydra config as a Config, validated unless `validate` is false (the only
    conversion; see train.py)."""
    from omegaconf import OmegaConf

    # A key the schema lacks (`+optim.lrr=0.1`, which Hydra admits) would otherwise be dropped in
    # silence by to_object, and the run would train without the setting its user asked for.
    for key in _keys_outside_schema(cfg):
        check_key(key)
    config = typing.cast(Config, OmegaConf.to_object(cfg))  # composed onto the Config schema
    return config.validate() if validate else config


def _keys_outside_schema(node, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that its dataclass schema has no field for."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, ListConfig):
        return [key for i, item in enumerate(node) for key in _keys_outside_schema(item, f"{prefix}{i}.")]
    if not isinstance(node, DictConfig):
        return []
    schema = OmegaConf.get_type(node)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found = []
    for key in map(str, node):  # a config's keys are strings
        if fields is not None and key not in fields:
            found.append(f"{prefix}{key}")
        else:
            found += _keys_outside_schema(node._get_node(key), f"{prefix}{key}.")
    return found


def check_key(key: str) -> None:
    """ConfigError naming `key` (dotted, as on the command line) and the nearest valid key,
    unless the schema has it. Below a map (sharding.tables.<feature>) or a list (features.sparse.<i>)
    the key is checked against the schema of its entries."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    node = OmegaConf.structured(Config)
    parts = key.split(".")
    depth = 0
    while depth < len(parts):
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            if parts[depth] not in node:
                parent = ".".join(parts[:depth])
                raise ConfigError(_unknown_key_message(key, parent, parts[depth], [str(k) for k in node]))
            node = node._get_node(parts[depth])
        elif isinstance(node, (DictConfig, ListConfig)) and dataclasses.is_dataclass(node._metadata.element_type):
            node = OmegaConf.structured(node._metadata.element_type)  # parts[depth] names the entry
        else:
            return  # a plain value, list or map: Hydra itself refuses what does not fit
        depth += 1


def _unknown_key_message(key: str, parent: str, name: str, siblings: list[str]) -> str:
    near = [f"{parent}.{n}" if parent else n for n in difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)]
    if not near:  # the right name in the wrong group (lr=0.1 for optim.lr=0.1)
        near = [k for k in _known_keys(Config) if k.rsplit(".", 1)[-1] == name][:1]
    hint = f" Did you mean {near[0]!r}?" if near else ""
    where = f"{parent!r} has" if parent else "the config has"
    return (
        f"{key!r} is not a config key: {where} no field {name!r}.{hint} "
        "`python -m app.train --cfg job` prints every key."
    )


def _known_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, groups and fields alike."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _known_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def config_from_dict(data: dict) -> Config:
    """A Config from its dataclasses.asdict() form (as checkpoints and exported models carry it),
    checked against the schema like a composed one: an unknown key, a wrong type or an impossible
    value is a ConfigError naming the key. It is read as plain data: a string such as
    '${oc.env:VAR}' stays that string, since a file someone sent must not pull values from this
    machine's environment into a model (or fail where the variable is unset)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), _literal(data))
        config = typing.cast(Config, OmegaConf.to_object(merged))
    except ConfigKeyError as error:
        check_key(error.full_key or str(error.key))
        raise ConfigError(_first_line(error)) from error  # a key check_key admits (below a plain map)
    except OmegaConfBaseException as error:
        raise ConfigError(
            f"{error.full_key}: {_first_line(error)}" if error.full_key else _first_line(error)
        ) from error
    return config.validate()


def _literal(value: Any) -> Any:
    """`value` (JSON-like data) with every '${' escaped, so that OmegaConf takes strings as they
    are: no resolver runs. OmegaConf reads '\\${' as a literal '${', and a backslash only before
    '${' as an escape, so those backslashes are doubled too."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda found: found.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {key: _literal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_literal(item) for item in value]
    return value


def _first_line(error: Exception) -> str:
    """OmegaConf's message without its full_key/object_type lines, nor the note on interpolation
    that escaping adds ("While dereferencing interpolation '...': ")."""
    message = str(error).splitlines()[0]
    return message.split("': ", 1)[1] if message.startswith("While dereferencing interpolation") else message


def check_override_keys(argv: list[str]) -> None:
    """Every key the command line sets must be in the schema, whatever its prefix (none, + or ++):
    a ConfigError naming the key and the nearest valid one. (Hydra refuses an unknown key without a prefix,
    but names no valid key; with + it adds the key, which the run would then ignore.)"""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, rest = get_args_parser().parse_known_args(argv)
    lines = args.overrides + [item for item in rest if not item.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:
        return  # not an override Hydra can parse: Hydra says why
    groups = {p.name for p in CONFIGS_DIR.iterdir() if p.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or override.package is not None or key.split(".")[0] == "hydra" or key in groups:
            continue
        check_key(key)
