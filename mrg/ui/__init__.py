"""The Gradio demo, one module per panel of the page (see ``mrg.ui.app``)."""

from mrg.ui.app import CSS, DemoApp
from mrg.ui.common import (
    COMPARE_BOTH,
    LOADING_BANNER,
    SHIPPED_EXAMPLES,
    WHOLE_REPORT,
    DemoState,
    Example,
    banner,
    default_examples,
    shipped_examples,
)
from mrg.ui.review import KEYBOARD_JS

__all__ = [
    "COMPARE_BOTH",
    "CSS",
    "KEYBOARD_JS",
    "LOADING_BANNER",
    "SHIPPED_EXAMPLES",
    "WHOLE_REPORT",
    "DemoApp",
    "DemoState",
    "Example",
    "banner",
    "default_examples",
    "shipped_examples",
]
