"""Backbone features: extraction, the on-disk feature cache, feature batches and the linear probes
that start the head and choose which blocks it reads.
"""
