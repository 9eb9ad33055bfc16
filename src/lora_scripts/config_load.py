"""Loading the training config: YAML files (duplicate keys refused), --set overrides, paths resolved against the
file, validation with errors that name the key, the bad value and the fix, and output_dir templates filled in.
The config's fields and their checks are config.py's; its loading functions are re-exported there, where every
caller imports them from."""

from __future__ import annotations

import difflib
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import (_MAX_NAME_BYTES, PATH_KEYS, TrainConfig, _outputs_apart_from_data, check_file_stem)
from .errors import ConfigError


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from --set; the value is read as YAML so numbers, booleans and lists get their type."""
    if "=" not in item:
        raise ConfigError("--set", [f"{item!r}: expected key=value, e.g. --set lora_rank=8"])
    key, _, raw = item.partition("=")
    if not raw.strip():
        return key.strip(), None
    try:
        return key.strip(), yaml.load(raw, Loader=_UniqueKeyLoader)
    except _DuplicateKey as exc:
        raise ConfigError("--set", [f"{key.strip()} = {raw!r}: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("--set", [f"{key.strip()} = {raw!r}: not a valid value ({problem}); quote text "
                                    f"with a brace, bracket or colon in it, e.g. --set '{key.strip()}=\"{raw}\"'"]) from None


def _unknown_key_problems(raw: dict[str, Any]) -> list[str]:
    known = list(TrainConfig.model_fields)
    problems = []
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else " See `lora-scripts init` for every key."
            problems.append(f"{key}: unknown key.{hint}")
    return problems


def _format_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "config"
    field = TrainConfig.model_fields.get(str(err["loc"][0])) if err["loc"] else None
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across keys: its message names them
        return msg
    if err["type"] == "missing":
        return f"{key}: required key is missing ({field.description if field else ''})"
    value = raw.get(str(err["loc"][0]), err.get("input")) if err["loc"] else err.get("input")
    value = str(value) if isinstance(value, Path) else value  # show the path as typed, not PosixPath('...')
    extra = (field.json_schema_extra or {}) if field else {}
    typical = f" (typical: {extra['typical']})" if isinstance(extra, dict) and "typical" in extra else ""
    return f"{key} = {value!r}: {msg}{typical}"


def validate_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    problems = _unknown_key_problems(raw)
    known = {k: v for k, v in raw.items() if k in TrainConfig.model_fields}
    try:
        config = TrainConfig.model_validate(known)
    except ValidationError as exc:
        problems += [_format_error(e, raw) for e in exc.errors()]
        config = None
    if problems:
        raise ConfigError(source, problems)
    return _fill_output_dir(config, source)


def _fill_output_dir(config: TrainConfig, source: str) -> TrainConfig:
    """output_dir: ./output/sci_lab_r{lora_rank}_e{epochs} -> one folder per config version."""
    text = str(config.output_dir)
    if "{" not in text and "}" not in text:
        return config
    try:
        filled = Path(fill_template(text, config))
    except ValueError as exc:
        raise ConfigError(source, [f"output_dir = {text!r}: {exc}; use config keys in braces, "
                                   "e.g. ./output/sci_lab_r{lora_rank}_e{epochs}"]) from None
    long = [part for part in filled.parts if len(part.encode()) > _MAX_NAME_BYTES]
    if long:
        raise ConfigError(source, [f"output_dir = {text!r}: the folder name {long[0][:40]!r}... is "
                                   f"{len(long[0].encode())} bytes long once filled in (at most {_MAX_NAME_BYTES}); "
                                   "use fewer or shorter keys"])
    name = config.output_name or filled.name
    filled_config = config.model_copy(update={"output_dir": filled, "output_name": name})
    try:
        check_file_stem(name)
        _outputs_apart_from_data(filled_config)
    except ValueError as exc:
        raise ConfigError(source, [f"output_dir = {text!r}: {exc}"]) from None
    return filled_config


_MAX_FIELD_WIDTH = 32  # a format spec such as {seed:>50000000} would otherwise build a 50 MB folder name


def fill_template(text: str, config: TrainConfig) -> str:
    """Fill `{key}` and `{key:spec}` with config values. Only plain keys: no attribute or index access
    ({seed.__class__}), no conversions, and short format specs, because the template is user input."""
    values = config.model_dump()
    values["output_name"] = config.output_name or ""
    out = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"cannot read the braces ({exc})") from None
    for literal, field, spec, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if field not in values:
            close = difflib.get_close_matches(field, list(values), n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise ValueError(f"{{{field}}} is not a config key{hint}")
        if conversion:
            raise ValueError(f"{{{field}!{conversion}}}: conversions are not supported, write {{{field}}}")
        if "{" in (spec or "") or _spec_width(spec or "") > _MAX_FIELD_WIDTH:
            raise ValueError(f"{{{field}:{spec}}} asks for a field wider than {_MAX_FIELD_WIDTH} characters")
        try:
            out.append(format(values[field], spec or ""))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot fill in {{{field}:{spec}}} ({exc})") from None
    return "".join(out)


def _spec_width(spec: str) -> int:
    digits = "".join(ch if ch.isdigit() else " " for ch in spec).split()
    return max((int(d) for d in digits), default=0)


def resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            p = Path(out[key]).expanduser()
            out[key] = p if p.is_absolute() else (base / p)
        elif out.get(key) == "":
            out[key] = None
    return out


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; a config with `lora_rank` set twice is refused.
    Keys merged in with `<<:` may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key; the base class reports it
            if first is not None:
                where = (f"lines {first + 1} and {key_node.start_mark.line + 1}" if first != key_node.start_mark.line
                         else f"twice on line {first + 1}")
                raise _DuplicateKey(None, None, f"{key}: set twice ({where}); YAML would silently keep the second "
                                    "value. Keep one of them", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """'line 10, column 13: expected ',' or ']'' with the line and a caret, instead of PyYAML's stream dump."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"not valid YAML: {exc}"
    lines = text.splitlines()
    shown = lines[mark.line] if mark.line < len(lines) else ""
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    where = f" ({context} at line {context_mark.line + 1})" if context and context_mark else ""
    return (f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{where}\n"
            f"    {shown}\n    {' ' * mark.column}^  (check brackets, quotes and the space after each ':')")


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read YAML, apply --set overrides, resolve relative paths, validate. Raises ConfigError."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(source, [f"config file {path} does not exist"])
        try:
            text = path.read_text(encoding="utf-8-sig")
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as exc:
            raise ConfigError(source, [f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); "
                                       "re-save it as UTF-8"]) from None
        except _DuplicateKey as exc:
            raise ConfigError(source, [exc.problem]) from None
        except yaml.YAMLError as exc:
            raise ConfigError(source, [_yaml_problem(exc, text)]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(source, [f"expected 'key: value' lines, got a {type(loaded).__name__}"])
        # Paths in a config file are relative to that file, so a config works from any working directory.
        raw = resolve_paths(loaded or {}, path.resolve().parent)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    # Paths given on the command line are relative to where the command runs, as in any shell tool.
    raw.update(resolve_paths(dict(items), Path.cwd()))
    return validate_config(raw, source)


def config_from_dict(raw: dict[str, Any], base_dir: Path, source: str = "config") -> TrainConfig:
    """Validate key/value pairs as if they were a YAML file in `base_dir` (the web UI's form)."""
    return validate_config(resolve_paths(raw, Path(base_dir).resolve()), source)


def problem_key(problem: str) -> str | None:
    """The config key a ConfigError line is about ('lora_rank = -3: ...' -> 'lora_rank'), None if general."""
    head = problem.split(":", 1)[0].split(" = ", 1)[0].strip()
    root = head.split(".", 1)[0]
    return root if root in TrainConfig.model_fields or (" " not in head and head.isidentifier()) else None

