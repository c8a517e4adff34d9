"""The published SDK 0.2.17's module for its `Client`, kept so that code importing from it works.

Every name is the SDK's own object, re-exported from `matchlock.sdk`; tests/unit/test_sdk_api.py checks
that each name the published module has is here. Importing this module loads the SDK.
"""

from .sdk import *  # noqa: F403
from .sdk import __all__ as __all__
