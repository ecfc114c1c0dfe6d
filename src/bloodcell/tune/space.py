"""The search space of a study: which train config keys vary (``Choice``, ``Range``) and which are
fixed, read from a space file over the packaged default (presets/tune/space.yaml), or a grid.

A space file maps train config keys to ``{choices: [...]}``, ``{low, high[, log][, step]}`` or a
plain value (fixed). Every value is checked as TrainConfig would check it; an error names the file
and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bloodcell.config import TrainConfig, coerce, hints, load_yaml, make_config
from bloodcell.errors import ConfigError
from bloodcell.models import model_info

# Keys a study may not search: they decide the data, the split or the objective, which every trial
# of a study must share for their values to be comparable.
NOT_SEARCHABLE = ("data", "model", "seed", "fractions", "val_fraction", "group_regex", "group_by",
                  "cache_dir", "monitor", "device", "threads", "nproc", "init_from", "weights")
NOT_IN_SPACE = ("data", "model", "monitor")  # given by --data, --model and --metric
SPEC_KEYS = {"choices", "low", "high", "log", "step"}


@dataclass(frozen=True)
class Choice:
    """A categorical parameter."""

    values: tuple

    def to_yaml(self) -> dict:
        return {"choices": list(self.values)}


@dataclass(frozen=True)
class Range:
    """A numeric parameter between low and high (inclusive), optionally log-scaled or stepped."""

    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def to_yaml(self) -> dict:
        d = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


def default_space_path() -> Path:
    """The packaged default space (presets/tune/space.yaml)."""
    return Path(str(resources.files("bloodcell") / "presets" / "tune" / "space.yaml"))


def _check_value(where: str, name: str, value) -> object:
    """Coerce one value to the config key's type and validate it as TrainConfig would."""
    try:
        v = coerce(name, hints(TrainConfig)[name], value)
        make_config(TrainConfig, {name: v})
    except ConfigError as e:
        raise ConfigError(f"{where}: {name}: {e}") from e
    return v


def _parse_entry(where: str, name: str, spec) -> Choice | Range | object:
    """One space entry: a Choice, a Range, or a fixed value; errors name the file and the key."""
    known = hints(TrainConfig)
    if name not in known:
        close = sorted(n for n in known if n.startswith(name[:3]) or name.startswith(n[:3]))
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key {name!r}: not a train config key{hint}")
    if name in NOT_IN_SPACE:
        flag = {"monitor": "--metric"}.get(name, f"--{name}")
        raise ConfigError(f"{where}: {name!r} cannot be in a space file; give it with {flag}")
    if not isinstance(spec, dict):
        return _check_value(where, name, spec)
    if name in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: {name!r} cannot be searched (every trial must share it); "
                          "give one fixed value")
    bad = sorted(set(spec) - SPEC_KEYS)
    if bad:
        raise ConfigError(f"{where}: {name}: unknown key {bad[0]!r} (use choices, or low and high "
                          "with optional log and step)")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{where}: {name}: give either choices or low/high, not both")
        values = spec["choices"]
        if not isinstance(values, list):
            raise ConfigError(f"{where}: {name}: choices must be a list, got {values!r}")
        if not values:
            raise ConfigError(f"{where}: {name}: empty choices")
        values = [_check_value(where, name, v) for v in values]
        if len(set(values)) < len(values):
            raise ConfigError(f"{where}: {name}: repeated choices {values}")
        return Choice(tuple(values))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {name}: needs choices, or both low and high")
    tp = known[name]
    if tp not in (int, float):
        raise ConfigError(f"{where}: {name}: is not a number; use choices")
    low, high = (_check_value(where, name, spec[k]) for k in ("low", "high"))
    log, step = bool(spec.get("log", False)), spec.get("step")
    if low > high:
        raise ConfigError(f"{where}: {name}: empty range, low {low} > high {high}")
    if tp is float and low == high:
        raise ConfigError(f"{where}: {name}: empty range, low == high == {low} (give a plain value "
                          "to fix it)")
    if log and low <= 0:
        raise ConfigError(f"{where}: {name}: a log range needs low > 0, got {low}")
    if step is not None:
        if log:
            raise ConfigError(f"{where}: {name}: give log or step, not both")
        if not isinstance(step, int | float) or step <= 0 or (tp is int and float(step) != int(step)):
            raise ConfigError(f"{where}: {name}: step must be a positive {tp.__name__}, got {step!r}")
        step = tp(step)
    return Range(low, high, log, step, tp is int)


def load_space(path: str | Path | dict | None = None, model: str | None = None,
               base: dict | None = None, defaults: bool = True) -> dict:
    """The default space with a space file's (or dict's) entries on top, validated.

    Returns name -> Choice | Range | fixed value. ``model`` drops ``norm`` for models without the
    option (and ``none`` from it for the baselines, which need a norm) and checks image sizes against the model's minimum; ``base`` is the config the fixed
    values apply to (checked together). ``defaults=False`` reads a resolved space alone.
    """
    where = f"default space {default_space_path()}"
    space = {k: _parse_entry(where, k, v) for k, v in load_yaml(default_space_path()).items()} \
        if defaults else {}
    if path is not None:
        where = "space" if isinstance(path, dict) else f"space file {path}"
        data = path if isinstance(path, dict) else load_yaml(path)
        for k, v in data.items():
            if not isinstance(k, str):  # YAML allows `1: x`, `null: x`
                raise ConfigError(f"{where}: key {k!r} is not a config key name")
            space[k.replace("-", "_")] = _parse_entry(where, k.replace("-", "_"), v)
    if model is not None:
        info = model_info(model)
        if "norm" not in info["options"]:
            space.pop("norm", None)
        elif info["family"] != "study" and isinstance(space.get("norm"), Choice):
            # the baselines take batch or group norm, not none: search what is left, if anything
            kept = tuple(v for v in space["norm"].values if v != "none")
            if len(kept) > 1:
                space["norm"] = Choice(kept)
            else:
                space.pop("norm")
        check_sizes(where, model, space.get("image_size"))
    try:
        make_config(TrainConfig, base or {}, fixed_values(space))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return space


def check_sizes(where: str, model: str, sizes) -> None:
    """Every image size a study may draw must suit the model (cnn4x32 needs 32 px or more)."""
    smallest = (min(sizes.values) if isinstance(sizes, Choice) else sizes.low
                if isinstance(sizes, Range) else min(sizes) if isinstance(sizes, list) else sizes)
    least = model_info(model)["min_image_size"]
    if smallest is not None and smallest < least:
        raise ConfigError(f"{where}: image_size {smallest} is below {model}'s minimum of {least} px")


def fixed_values(space: dict) -> dict:
    """The entries of a space that are fixed (neither searched nor a grid's)."""
    return {k: v for k, v in space.items() if not isinstance(v, Choice | Range)}


def space_to_yaml(space: dict) -> dict:
    """The space as a plain mapping (the space-file format)."""
    return {k: v.to_yaml() if isinstance(v, Choice | Range) else v for k, v in space.items()}


def parse_grid(items: list[str] | dict | None) -> dict:
    """``["image_size=48,64,96", "batch_size=32,64"]`` -> ``{"image_size": [48, 64, 96], ...}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        items = [f"{k}={','.join(map(str, v))}" for k, v in items.items()]
    grid: dict[str, list] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--grid: {item!r} is not KEY=V1,V2,...")
        spec = [v.strip() for v in values.split(",") if v.strip()]
        entry = _parse_entry("--grid", name, {"choices": spec})
        if name in grid:
            raise ConfigError(f"--grid: {name} given twice")
        grid[name] = list(entry.values)
    return grid


def suggest(trial, space: dict, grid: dict) -> dict:
    """The config values a trial draws (searched entries, or the grid's); fixed ones are left out."""
    if grid:  # the study's hand strategy: the grid alone varies, everything else stays fixed
        return {k: trial.suggest_categorical(k, v) for k, v in grid.items()}
    params = {}
    for name, spec in space.items():
        if isinstance(spec, Choice):
            params[name] = trial.suggest_categorical(name, list(spec.values))
        elif isinstance(spec, Range) and spec.integer:
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high),
                                             step=int(spec.step or 1), log=spec.log)
        elif isinstance(spec, Range):
            params[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return params
