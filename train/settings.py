"""Settings declared once: a dataclass field made by `setting` carries its default, help
text, check and short names, and the command line's flags (`add_flags`), the checks
(`check_fields`) and the keys a config file may use (`keys`) are derived from the fields.

    @dataclasses.dataclass(frozen=True)
    class Hparams:
        learning_rate: float = setting(3e-4, "peak learning rate", POSITIVE, aliases=("lr",))

gives `--learning-rate` / `--lr` with that help, `learning_rate=` / `lr=` as keys, and
"learning_rate (--learning-rate, --lr): expected a positive number, got -1" for a bad value.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterable


@dataclasses.dataclass(frozen=True)
class Check:
    """What a setting's value must satisfy, and how an error message says it."""

    ok: Callable[[Any], bool]
    expects: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


POSITIVE_INT = Check(lambda v: _is_int(v) and v >= 1, "a positive integer")
NON_NEGATIVE_INT = Check(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
POSITIVE = Check(lambda v: _is_number(v) and v > 0, "a positive number")
NON_NEGATIVE = Check(lambda v: _is_number(v) and v >= 0, "a non-negative number")
FRACTION = Check(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
DECAY_RATE = Check(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
MAPPING = Check(lambda v: isinstance(v, dict), "a mapping")


def one_of(choices: Iterable[Any]) -> Check:
    choices = tuple(choices)
    return Check(lambda v: v in choices, f"one of {choices}")


def setting(default: Any = dataclasses.MISSING, help: str = "", check: Check | None = None, *,
            factory: Callable[[], Any] | None = None, aliases: tuple[str, ...] = (),
            flag: dict[str, Any] | None = None) -> Any:
    """A dataclass field with its help text; `check` (a None value passes where the default
    is None); `aliases`, short names accepted as flags and keys; `flag`, argparse keywords
    over the ones derived from the field's type."""
    meta = {"help": help, "check": check, "aliases": aliases, "flag": flag or {}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_names(field: dataclasses.Field) -> list[str]:
    """["--learning-rate", "--lr"]: the field's name, then its aliases."""
    return ["--" + n.replace("_", "-") for n in (field.name, *field.metadata.get("aliases", ()))]


def keys(cls: type) -> dict[str, str]:
    """{key or alias: field name} for the fields of dataclass `cls`."""
    out = {}
    for f in dataclasses.fields(cls):
        out.update({a: f.name for a in (f.name, *f.metadata.get("aliases", ()))})
    return out


def declared(cls: type) -> dict[str, Any]:
    """{field name: its declared default} for dataclass `cls`, without making one."""
    return {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls)}


def check_fields(obj: Any) -> None:
    """Raises ValueError naming the first field of dataclass `obj` that fails its check."""
    for f in dataclasses.fields(obj):
        check, value = f.metadata.get("check"), getattr(obj, f.name)
        if check is None or (value is None and f.default is None):
            continue
        if not check.ok(value):
            raise ValueError(f"{f.name} ({', '.join(flag_names(f))}): expected {check.expects}, "
                             f"got {value!r}")


def _flag_kwargs(hint: Any) -> dict[str, Any] | None:
    """argparse keywords for a field's type; None for the types no flag takes (mappings,
    nested settings)."""
    if hint is bool:
        return {"action": "store_true"}
    if hint is list:
        return {"nargs": "+"}
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    if len(kinds) == 1 and kinds[0] in (int, float, str):
        return {"type": kinds[0]}
    if all(t in (bool, str) for t in kinds):  # `bool | str`: a name (flag["choices"])
        return {"type": str}
    return None


def add_flags(group: argparse._ActionsContainer, cls: type, shown: dict[str, Any]) -> None:
    """A flag for each field of dataclass `cls` that takes one (not mappings), defaulting to
    None so that a flag not given leaves lower layers alone. The help states the default
    from `shown` unless the help text says it (as it must where the default is None)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kwargs = _flag_kwargs(hints[f.name])
        if kwargs is None:
            continue
        default, text = shown.get(f.name), f.metadata["help"]
        if "default" not in text and default is not None and default is not False:
            text += f" (default: {default})"
        text = text.replace("%", "%%")  # argparse formats help with %
        kwargs.update(dest=f.name, default=None, help=text, **f.metadata["flag"])
        group.add_argument(*flag_names(f), **kwargs)
