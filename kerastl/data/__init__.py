"""Where images come from: files and folders, CSV/DataFrame/tf.data readers, bundled datasets, label
tables, splits, augmentation and tf.data pipelines.

This wing knows nothing of models, features, training or runs. Import its modules directly
(`kerastl.data.images`, `kerastl.data.sources`, ...): this file imports nothing, so reading a label
table does not import TensorFlow.
"""
