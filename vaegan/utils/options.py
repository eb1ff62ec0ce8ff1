"""One line for a command line or config file the parser refused: the option as the user wrote it, the file it
came from, and the fix (the closest valid key, or how to write the value), instead of a screen of usage."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text", "NoneType": "null"}


def explain_parse_error(error: Exception, argv: list[str], known: Iterable[str], command: str) -> str:
    """What jsonargparse's `error` means for the arguments `argv` of `command` ("vaegan encode"), whose valid keys
    are `known` (dotted, without dashes), in one line that ends by pointing to the command's help."""
    return f"{describe(error, argv, known)}; `{command} --help` lists the options"


def describe(error: Exception, argv: list[str], known: Iterable[str]) -> str:
    """The mistake behind jsonargparse's `error`, named as the user wrote it."""
    text = " ".join(str(error).split())
    known = sorted(known)
    if match := re.match(r"unrecognized arguments: (--?[\w.-]+\+?)", text):
        option = match[1]
        if option.endswith("+") and option[:-1].lstrip("-") in known:  # `+` appends to lists, and this is a tuple
            return f"{option}: {option[:-1]} is given whole, not appended to: write {option[:-1]} [a, b]"
        plus = "+" if option.endswith("+") else ""
        return f"unknown option {option}{closest(option.lstrip('-').rstrip('+'), known, '--', plus)}"
    if match := re.search(r"(?:does not accept option|Option) '([\w.]+)'", text):
        key = match[1]
        return f"{config_file_with(key, argv) or 'a config file'}: unknown key {key}{closest(key, known, '')}"
    if match := re.match(r"argument (--[\w.]+): expected one argument", text):
        option = match[1]
        following = argv[argv.index(option) + 1] if option in argv[:-1] else None
        if following is not None and re.fullmatch(r"-[\d.]+(e-?\d+)?", following):
            return f"{option}: a negative value is read as an option; write it as {option}={following}"
        return f"{option} needs a value"
    if match := re.match(r'Parser key "([\w.]+)": (.*)', text):
        key, problem = match[1], match[2]
        given = re.search(r"(?:Given value|Got value): (.*?)$", problem)
        types = problem.split("Given value")[0].split("Got value")[0]
        expected = re.findall(r"<class '(\w+)'>|Literal\[([^\]]*)\]", types)  # [(class, ""), ("", choices)]
        wanted = " or ".join(dict.fromkeys(TYPE_NAMES.get(name, name) if name else f"one of {choices}"
                                           for name, choices in expected))
        value = f"{given[1]!r} " if given else ""
        return f"--{key}: {value}is not {wanted or 'a valid value'}" + (f" ({where})" if (
            where := config_file_with(key, argv)) else "")
    if match := re.match(r"the following arguments are required: (.*)", text):
        return "missing " + ", ".join(f"--{name.strip()}" for name in match[1].split(","))
    return text


def closest(key: str, known: list[str], prefix: str, suffix: str = "") -> str:
    """" (did you mean --crop?)" for the valid key nearest to a misspelt one, and otherwise nothing."""
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{matches[0]}{suffix}?)" if matches else ""


def config_file_with(key: str, argv: list[str]) -> str | None:
    """The last config file among `argv`'s `--config FILE` that sets the dotted `key`, if any."""
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    files += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for name in reversed(files):
        path = Path(name)
        try:
            data = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            data = data.get(part, KeyError) if isinstance(data, dict) else KeyError
        if data is not KeyError:
            return name
    return None
