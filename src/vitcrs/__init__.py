"""vitcrs: column-row sampled backward passes for Vision Transformers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vitcrs")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0+unknown"
