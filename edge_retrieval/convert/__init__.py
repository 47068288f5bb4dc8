"""Workstation converter: Keras/TF descriptor encoders → TFLite bundles the device can load.
TensorFlow, Keras and torch are imported here only (``pip install -e .[converter]``)."""
