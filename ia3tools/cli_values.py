"""Values the command line parses before calling the API: click callbacks for merge's options,
blend's weights (given after --weights or trailing the adapters), and an option taking one or
more values."""

from __future__ import annotations

import os

import click


def parse_device(ctx, param, value: str) -> str:
    if value in ("cpu", "cuda", "auto") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise click.BadParameter("expected cpu, cuda, cuda:N or auto")


def parse_dtype(ctx, param, value: str | None) -> str | None:
    from ia3tools.formats.dtypes import FRIENDLY

    if value is None or value == "keep":
        return None
    if value.lower() not in FRIENDLY:
        raise click.BadParameter("expected keep, bf16, fp16 or fp32")
    return FRIENDLY[value.lower()]


def parse_size_option(ctx, param, value: str | None) -> int | None:
    from ia3tools.commands.merge import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


class OneOrMore(click.Option):
    """An option taking one or more values, up to the next option: ``--runtime-adapters A B C``
    (repeating the option works too). click has no such option; this extends its parser's
    handling of the option (a private hook: where it is missing, only repetition works)."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = getattr(parser, "_long_opt", {}).get(name) or getattr(parser, "_short_opt", {}).get(name)
            if option is None or not hasattr(option, "process"):
                continue
            process = option.process

            def greedy(value, state, process=process):
                process(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    process(state.rargs.pop(0), state)

            option.process = greedy


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_trailing_numbers(items: list[str]) -> tuple[list[str], list[str]]:
    """Split positionals into adapter paths and the trailing numbers that are not paths."""
    end = len(items)
    while end > 0 and _is_number(items[end - 1]) and not os.path.exists(items[end - 1]):
        end -= 1
    return items[:end], items[end:]


def parse_weights(raw: tuple[str, ...]) -> list[float]:
    values = []
    for item in raw:
        for part in item.replace(",", " ").split():
            try:
                values.append(float(part))
            except ValueError:
                raise click.BadParameter(f"{part!r} is not a number", param_hint="--weights") from None
    return values
