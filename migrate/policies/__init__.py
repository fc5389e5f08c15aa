"""Push and prefetch policies: which page ranges the bulk path sends next, what a fault fetches with it.

`--policy NAME[:key=value,...]` names a built-in (sequential, bubble,
trend, replay) or a class in a module of the user's (`mymod:MyPolicy[:k=v]`,
imported by the destination agent from its own path). The protocol is in
base.py, the built-ins in builtins.py, the thread that runs one in
runner.py.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from migrate.policies.base import Policy, PolicyError
from migrate.policies.builtins import BUILTINS

__all__ = ["PolicySpec", "Policy", "PolicyError", "parse", "BUILTINS"]


@dataclass(frozen=True)
class PolicySpec:
    """A parsed `--policy`: a built-in name or module:Class, and its parameters (strings)."""

    name: str
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.name + "".join(f"{':' if i == 0 else ','}{k}={v}" for i, (k, v) in enumerate(self.params))

    def without(self, key: str) -> PolicySpec:
        return PolicySpec(self.name, tuple((k, v) for k, v in self.params if k != key))

    def get(self, key: str) -> str | None:
        return dict(self.params).get(key)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTINS

    def require_builtin(self) -> None:
        """PolicyError unless a built-in: an agent imports a user's module only when started to
        (--allow-policy-modules)."""
        if not self.builtin:
            raise PolicyError(f"policy {self.name} is a module:Class, and this destination agent loads none; "
                              f"start it with --allow-policy-modules, or use one of {', '.join(BUILTINS)}")

    def policy_class(self) -> type[Policy]:
        if self.name in BUILTINS:
            return BUILTINS[self.name]
        module_name, sep, cls_name = self.name.partition(":")
        if not sep:
            raise PolicyError(f"unknown policy {self.name!r}; use one of {', '.join(BUILTINS)} or module:Class")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise PolicyError(f"policy module {module_name!r} cannot be imported: {err}") from None
        cls = getattr(module, cls_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Policy)):
            raise PolicyError(f"{self.name}: {module_name} has no Policy subclass named {cls_name!r}")
        return cls

    def build(self) -> Policy:
        """The policy, its parameters converted; PolicyError with one line if it cannot be built."""
        cls = self.policy_class()
        kwargs = {}
        for key, value in self.params:
            convert = cls.params.get(key)
            if convert is None:
                known = ", ".join(cls.params) or "none"
                raise PolicyError(f"policy {self.name} takes no parameter {key!r} (it takes: {known})")
            try:
                kwargs[key] = convert(value)
            except ValueError:
                raise PolicyError(f"policy {self.name}: {key}={value!r} is not a valid {convert.__name__}") from None
        try:
            return cls(**kwargs)
        except PolicyError:
            raise
        except (ValueError, TypeError) as err:
            raise PolicyError(f"policy {self.name}: {err}") from None


def parse(text: str) -> PolicySpec:
    """`NAME[:key=value,...]` or `module:Class[:key=value,...]`; PolicyError with one line when malformed."""
    if not text or len(text) > 4096:
        raise PolicyError("a policy is NAME[:key=value,...] or module:Class[:key=value,...]")
    head, _, rest = text.partition(":")
    if head not in BUILTINS and rest and "=" not in rest.partition(":")[0]:
        cls, _, rest = rest.partition(":")  # module:Class[:params]
        head = f"{head}:{cls}"
    params = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise PolicyError(f"policy parameter {item!r} is not key=value")
        params.append((key.strip(), value.strip()))
    return PolicySpec(head, tuple(params))
