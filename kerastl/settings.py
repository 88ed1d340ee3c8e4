"""The settings table, derived from the config dataclasses: one table, not two.

Every field of the run's config dataclasses is declared with `setting(...)`: its help text, the
kind of value a command line reads for it, the default a person is shown, whether a search may
vary it (and in which order its hyperparameters are declared), and whether it is a setting of
the machine rather than of the experiment. Groups of settings (a `PhaseConfig` twice, the
`ValidationConfig`) are declared with `group(...)`, which names their settings with a prefix.

`settings_of(RunConfig)` walks the dataclasses once and returns name -> `Setting`; the command
line's flags (`kerastl.cli.arguments`), the search space's names (`kerastl.tune.config`) and the
run digest (`kerastl.runs.resume`) all read it. `JsonConfig` round-trips such dataclasses to
JSON, and `read_config_file` reads a config file (JSON or TOML). No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable

from kerastl.errors import KerastlError

GROUPS = ("data", "model", "training", "validation", "feature cache", "devices", "output")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_SUFFIXES = (".json", ".toml")


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's value; a missing or malformed file is a one-line `KerastlError` naming `what`."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KerastlError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise KerastlError(f"{what} {path} is not valid JSON: {error}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's values: JSON (`.json`) or TOML (`.toml`, tables `[data]`, `[model]`, `[train]`,
    and `[tune]` for a search). TOML has no null: a key left out keeps its default, and
    `weights = "none"` trains from scratch. A bad file is a one-line `KerastlError`."""
    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise KerastlError(f"config file {path} must end in .json or .toml")
    if path.suffix.lower() == ".json":
        values = read_json(path, "config file")
    else:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise KerastlError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise KerastlError(f"config file {path} is not valid TOML: {error}") from None
    if not isinstance(values, dict):
        raise KerastlError(f"config file {path} must hold an object of settings, not {type(values).__name__}")
    return values


class JsonConfig:
    """`to_dict`/`from_dict` for dataclasses of settings (and groups of them); unknown keys are an
    error, not ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KerastlError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
        groups = {f.name: f for f in dataclasses.fields(cls) if "group" in f.metadata}

        def read(key: str, value: Any) -> Any:  # a group's keys left out keep that group's own defaults
            if key not in groups or not isinstance(value, dict):
                return value
            group_field = groups[key]
            own = dataclasses.asdict(group_field.default_factory())  # type: ignore[misc]
            return group_field.metadata["group"]["kind"].from_dict({**own, **value})

        return cls(**{key: read(key, value) for key, value in values.items()})


def setting(default: Any = MISSING, help: str = "", *, kind: str = "text", name: str | None = None,
            metavar: str | None = None, choices: tuple[str, ...] | None = None, shown: str | None = None,
            search: int = 0, machine: bool = False, hidden: bool = False, group: str | None = None,
            default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field that is a setting.

    Args:
        default: its default value.
        help: what it does, for `--help` (its default is added from `default` or `shown`).
        kind: how a command line reads it: "text", "int", "count:N" (a whole number of at least N),
            "fraction" ([0, 1)), "positive", "nonneg", "bool" (--x/--no-x), "choice" (of `choices`),
            or a name `kerastl.cli.arguments` knows ("features", "blocks", "class_weight", "decay").
        name: its setting name when it is not the field's (`--data` for `source`).
        shown: the default as `--help` shows it ("" shows none).
        search: 0, or its place in a search's hyperparameter declarations (1 first).
        machine: a setting of the machine, not of the experiment: left out of the run digest and of
            `config.json` (`RunConfig.experiment_dict`).
        hidden: no command-line flag.
        group: its `--help` group, when not its dataclass's.
    """
    metadata = {"help": help, "kind": kind, "name": name, "metavar": metavar, "choices": choices, "shown": shown,
                "search": search, "machine": machine, "hidden": hidden, "group": group}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": metadata})


def group(kind: type, default_factory: Callable[[], Any], prefix: str = "", group: str | None = None,
          fields: dict[str, dict[str, Any]] | None = None) -> Any:
    """A field holding a dataclass of settings, named `prefix` + each setting's name; `fields`
    overrides what `setting` declared, per field of `kind` (its help, name, kind, hidden, ...)."""
    metadata = {"kind": kind, "prefix": prefix, "group": group, "fields": fields or {}}
    return dataclasses.field(default_factory=default_factory, metadata={"group": metadata})


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives in a `RunConfig` (`path`) and how a person sets it."""

    name: str
    path: tuple[str, ...]
    default: Any
    help: str = ""
    kind: str = "text"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    shown: str | None = None
    search: int = 0
    machine: bool = False
    hidden: bool = False
    group: str = "output"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def help_text(self) -> str:
        """The help with the default as a person reads it: "(0.2)", "(on)", or `shown`."""
        shown = self.shown if self.shown is not None else _shown(self.default)
        return f"{self.help} ({shown})" if shown else self.help


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def settings_of(kind: type, path: tuple[str, ...] = (), prefix: str = "", group_name: str | None = None,
                overrides: dict[str, dict[str, Any]] | None = None, defaults: Any = None) -> dict[str, Setting]:
    """Setting name -> `Setting` for every setting of the dataclass `kind` (and of its groups), in
    declaration order. `defaults`: an instance whose values are the defaults (a group's own)."""
    table: dict[str, Setting] = {}
    for f in dataclasses.fields(kind):
        if "group" in f.metadata:
            g = f.metadata["group"]
            own = f.default_factory() if defaults is None else getattr(defaults, f.name)  # type: ignore[misc]
            table.update(settings_of(g["kind"], (*path, f.name), prefix + g["prefix"], g["group"] or group_name,
                                     g["fields"], own))
            continue
        if "setting" not in f.metadata:
            continue
        meta = {**f.metadata["setting"], **(overrides or {}).get(f.name, {})}
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        name = prefix + (meta["name"] or f.name)
        table[name] = Setting(name, (*path, f.name), default, meta["help"], meta["kind"], meta["metavar"],
                              meta["choices"], meta["shown"], meta["search"], meta["machine"], meta["hidden"],
                              meta["group"] or group_name or "output")
    return table


def dict_at(values: dict[str, Any], setting: Setting) -> tuple[dict[str, Any], str]:
    """Where `setting` lives in a config's `to_dict()`: the innermost dict and its key there."""
    *parents, last = setting.path
    for part in parents:
        values = values[part]
    return values, last


def get_setting(config: Any, setting: Setting) -> Any:
    """The value of `setting` in `config` (a `RunConfig`)."""
    for part in setting.path:
        config = getattr(config, part)
    return config


def set_setting(config: Any, setting: Setting, value: Any) -> None:
    """Sets `setting` in `config` (a `RunConfig`) to `value`."""
    *parents, last = setting.path
    for part in parents:
        config = getattr(config, part)
    setattr(config, last, value)
