"""The edge image-retrieval appliance (device side). Never imports TensorFlow, Keras or torch."""
from importlib.metadata import PackageNotFoundError, version

try:  # what Home Assistant shows as the device's software version, and `edge-retrieval --version`
    __version__ = version("edge-retrieval")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
