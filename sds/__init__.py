"""sds: relay server and operations toolkit for SDS (shareable-data-store) clients.

The public Python API::

    from sds import create_app, load_config, Config, LiveStore, reject_write_frame
"""

from sds.app import create_app
from sds.config import Config, ConfigError, load_config
from sds.protocol import FrameType, reject_write_frame
from sds.relay import LiveStore
from sds.tokens import mint_token, parse_duration, verify_token

__all__ = [
    "Config",
    "ConfigError",
    "FrameType",
    "LiveStore",
    "create_app",
    "load_config",
    "mint_token",
    "parse_duration",
    "reject_write_frame",
    "verify_token",
]
