"""The edge image-retrieval appliance (device side). Never imports TensorFlow, Keras or torch."""
