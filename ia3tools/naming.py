"""Names across namespaces. An adapter names modules as the model PEFT wrapped saw them (e.g.
``bert.encoder...`` under ``BertForSequenceClassification``); a base checkpoint may be the bare
backbone (``encoder...``) or, the other way round, carry a prefix the adapter lacks
(``model.layers...`` against ``layers...``). Exact names always win; a prefix is crossed only
when the exact name is absent, and an ambiguous crossing is reported, never guessed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping


def base_modules(tensors: Mapping) -> list[str]:
    """Module names of a checkpoint: every tensor ``X.weight`` names a module ``X``."""
    return [name[: -len(".weight")] for name in tensors if name.endswith(".weight")]


class BaseNames:
    """A checkpoint's tensor names, with the first name components indexed once (looking a name up
    across a prefix then costs one probe per prefix, not a scan of every tensor)."""

    def __init__(self, tensors: Mapping):
        self.tensors = tensors
        self.prefixes = sorted({t.partition(".")[0] for t in tensors if "." in t})

    def candidates(self, name: str) -> list[tuple[str, str, str | None]]:
        """(base tensor, kind, prefix) for every way ``name`` may be found."""
        tensors = self.tensors
        if name in tensors:
            return [(name, "exact", None)]
        found = []
        head, sep, rest = name.partition(".")
        if sep and rest in tensors:
            found.append((rest, "strip", head))
        for prefix in self.prefixes:
            if f"{prefix}.{name}" in tensors:
                found.append((f"{prefix}.{name}", "add", prefix))
        return found


@dataclass
class NameMap:
    """How the base's namespace relates to the adapter's.

    ``strip``: adapter names are ``<prefix>.<base name>`` (the base is a bare backbone);
    ``add``: base names are ``<prefix>.<adapter name>``; ``exact``: the same names.
    """

    kind: str = "exact"
    prefix: str | None = None
    rename_output: bool = False

    @classmethod
    def infer(cls, base: BaseNames, adapter_names: list[str]) -> "NameMap":
        votes: Counter = Counter()
        for name in adapter_names:
            for probe in (f"{name}.weight", name):
                found = base.candidates(probe)
                if len(found) == 1:
                    votes[(found[0][1], found[0][2])] += 1
                    break
        if not votes or votes[("exact", None)] >= max(votes.values()):
            return cls()
        (kind, prefix), _ = votes.most_common(1)[0]
        return cls(kind, prefix)

    def finish(self, *, added_heads: bool) -> None:
        # A bare backbone that gains a task head is written in the task model's namespace, so
        # that AutoModelFor<Task> finds both the backbone (under its prefix) and the head.
        self.rename_output = self.kind == "strip" and added_heads

    def to_adapter(self, base_name: str) -> str:
        if self.kind == "strip":
            return f"{self.prefix}.{base_name}"
        if self.kind == "add" and base_name.startswith(f"{self.prefix}."):
            return base_name[len(self.prefix) + 1 :]
        return base_name

    def output_name(self, base_name: str) -> str:
        return f"{self.prefix}.{base_name}" if self.rename_output else base_name

    def added_output(self, adapter_name: str) -> str:
        """Output name of a tensor the adapter adds (a head the base lacks)."""
        return f"{self.prefix}.{adapter_name}" if self.kind == "add" else adapter_name

    def describe(self) -> str:
        if self.kind == "strip":
            return f"adapter names carry the prefix '{self.prefix}.' that the base lacks"
        if self.kind == "add":
            return f"base names carry the prefix '{self.prefix}.' that the adapter lacks"
        return "names match exactly"


def resolve(name: str, base: BaseNames, names: NameMap) -> str | list[str]:
    """The base tensor for adapter-namespace ``name``: a string when exactly one is found, else
    the list of candidates (empty when none, several when ambiguous)."""
    found = base.candidates(name)
    if len(found) > 1:
        # The inferred namespace relation settles a tie; anything else is ambiguous.
        preferred = [f for f in found if (f[1], f[2]) == (names.kind, names.prefix)]
        if len(preferred) == 1:
            return preferred[0][0]
    if len(found) == 1:
        return found[0][0]
    return [f[0] for f in found]
