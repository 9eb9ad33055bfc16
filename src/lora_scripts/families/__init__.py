"""Model families. A new family is a new module registered here; nothing outside this package branches on one."""

from .base import COMPONENTS, Family
from .detect import detect_family
from . import sd15, sd2

FAMILIES: dict[str, Family] = {f.name: f for f in (sd15.FAMILY, sd2.FAMILY)}

__all__ = ["COMPONENTS", "FAMILIES", "Family", "detect_family"]
