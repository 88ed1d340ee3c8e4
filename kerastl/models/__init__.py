"""The backbone registry, `simple_cnn`, the `TransferClassifier` object with its layers, and export.

Models know nothing of data pipelines, features, training or runs.
"""
