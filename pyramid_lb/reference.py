"""The README's settings reference, generated from the settings tables.

python -m pyramid_lb.reference README.md
"""

from __future__ import annotations

import sys

from pyramid_lb import ADDON_SETTINGS
from pyramid_lb.dispatcher.config import DISPATCHER_SETTINGS
from pyramid_lb.settings import ADDON_PREFIX, reference, write_readme


def blocks() -> dict[str, str]:
    """Every settings reference, by the name of its README block."""
    return {
        "addon": reference(ADDON_SETTINGS, ADDON_PREFIX),
        "dispatcher": reference(DISPATCHER_SETTINGS),
    }


if __name__ == "__main__":
    write_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md", blocks())
