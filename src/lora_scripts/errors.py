"""Typed errors. Each message names what is wrong, the value, and the fix; only cli.py turns them into exit codes."""


class LoraScriptsError(Exception):
    """Base class: a problem the user can fix (bad config, data or model file)."""


class ConfigError(LoraScriptsError):
    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source} has {len(problems)} {noun}:\n" + "\n".join(f"  {p}" for p in problems))


class DatasetError(LoraScriptsError):
    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = problems
        lines = [f"the dataset has {len(problems)} problem(s):"] + [f"  {p}" for p in problems[:50]]
        if len(problems) > 50:
            lines.append(f"  … and {len(problems) - 50} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelLoadError(LoraScriptsError):
    pass


class TrainingError(LoraScriptsError):
    pass


class TrainingInterrupted(LoraScriptsError):
    """Ctrl-C: a checkpoint was saved; the message says how to continue."""


class OutputDirError(LoraScriptsError):
    pass


class DiskFullError(OutputDirError):
    """A write ran out of space; the file under the final name (if any) is untouched."""
