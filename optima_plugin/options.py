"""Plugin-owned options, declared pytest-style through the ``optima_addoption`` hook.

A plugin declares its flags in a group named after it::

    from optima_plugin import hookimpl

    class MyPlugin:
        @hookimpl
        def optima_addoption(self, parser):
            group = parser.getgroup("my_selector", "my_selector (--prune_method my_selector)")
            group.addoption("my_alpha", type=float, default=0.5, help="how much",
                            check=lambda v: 0 < v < 1, requirement="must be in (0, 1)")

The flag (``--my_alpha``) then appears in ``optima-prune`` and ``optima-host``, the
Python API accepts ``prune(..., my_alpha=0.3)``, the value is validated once in
:func:`optima_plugin.validate.resolve` and the
plugin reads it with ``config.option("my_alpha")``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Option:
    """One declared option; the flag is ``--<name>``.

    Attributes:
        name: the option's name (config key, keyword of the Python API, flag without ``--``).
        type: ``float``, ``int``, ``str`` or ``bool`` (a bool is a ``store_true`` flag, default False).
        default: the value when not given.
        help: the flag's help line.
        group: the declaring plugin's group name.
        choices: the allowed values, or None.
        check: ``value -> bool``; False is an error ``--<name> <requirement>, got <value>``.
        requirement: the error's wording, e.g. ``must be in [0, 1)``.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    group: str
    choices: Optional[tuple] = None
    check: Optional[Callable[[Any], bool]] = None
    requirement: str = "is invalid"

    def validate(self, value: Any) -> None:
        """``ValueError`` naming the flag when ``value`` is not one of the choices or fails the check."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"--{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"--{self.name} {self.requirement}, got {value!r}")


def declared_defaults(*declare: Callable[["OptionParser"], None]) -> dict[str, Any]:
    """``{name: default}`` of the options the ``declare(parser)`` functions (a plugin's ``addoption``) declare."""
    parser = OptionParser()
    for add in declare:
        add(parser)
    return parser.defaults()


class OptionGroup:
    """The options of one plugin (see :meth:`OptionParser.getgroup`)."""

    def __init__(self, parser: "OptionParser", name: str) -> None:
        self.parser, self.name = parser, name

    def addoption(self, name: str, **kwargs: Any) -> None:
        """:meth:`OptionParser.addoption` in this group."""
        self.parser.addoption(name, group=self.name, **kwargs)


class OptionParser:
    """The options every registered plugin declared (filled by the ``optima_addoption`` hook).

    Args:
        reserved: names taken by the core options (a plugin may not declare them).
    """

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        self.options: dict[str, Option] = {}
        self.groups: dict[str, str] = {}
        self._reserved = set(reserved)

    def getgroup(self, name: str, description: str = "") -> OptionGroup:
        """The group ``name`` (a plugin's name), created on first use; ``description`` titles its help."""
        self.groups.setdefault(name, description or name)
        return OptionGroup(self, name)

    def addoption(self, name: str, *, type: Callable[[str], Any] = str, default: Any = None, help: str = "",
                  choices: Optional[Sequence] = None, check: Optional[Callable[[Any], bool]] = None,
                  requirement: str = "is invalid", group: str = "plugins") -> None:
        """Declare ``--<name>``; ``ValueError`` when the name is a core option or declared already."""
        if name.startswith("-") or not name.isidentifier():
            raise ValueError(f"plugin option {name!r}: give the name without dashes, a Python identifier")
        if type is bool and default not in (None, False):
            raise ValueError(f"plugin option --{name} (group {group}): a bool option is a store_true flag, "
                             "default False")
        if name in self._reserved:
            raise ValueError(f"plugin option --{name} (group {group}) clashes with a core option")
        if name in self.options:
            raise ValueError(f"plugin option --{name} (group {group}) is declared already by group "
                             f"{self.options[name].group}")
        self.groups.setdefault(group, group)
        self.options[name] = Option(name, type, False if type is bool else default, help, group,
                                    tuple(choices) if choices is not None else None, check, requirement)

    def defaults(self) -> dict[str, Any]:
        """``{name: default}`` of every declared option."""
        return {name: opt.default for name, opt in self.options.items()}

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` completed with the defaults, in declaration order, each validated.

        ``ValueError`` for an undeclared name or a value that fails its option's validation.
        """
        unknown = sorted(set(values) - set(self.options))
        if unknown:
            raise ValueError(f"unknown plugin option(s) {', '.join(unknown)}; declared: "
                             f"{', '.join(sorted(self.options)) or 'none'}")
        out = {name: values.get(name, opt.default) for name, opt in self.options.items()}
        for name, opt in self.options.items():
            opt.validate(out[name])
        return out

    def add_to_argparse(self, parser: argparse.ArgumentParser) -> None:
        """Add every option as ``--<name>`` to ``parser``, one argument group per plugin group.

        Values are not checked here (``choices`` are shown only): validation happens once, with
        the core options, so a bad value gives the same one-line error as any other option.
        """
        groups = {name: parser.add_argument_group(title) for name, title in self.groups.items()}
        for opt in self.options.values():
            add = groups[opt.group].add_argument
            if opt.type is bool:
                add(f"--{opt.name}", action="store_true", help=opt.help)
            else:
                metavar = "{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else None
                add(f"--{opt.name}", type=opt.type, default=opt.default, metavar=metavar, help=opt.help)

    def values(self, namespace: argparse.Namespace) -> dict[str, Any]:
        """``{name: value}`` of the declared options in parsed ``namespace``."""
        return {name: getattr(namespace, name) for name in self.options}
