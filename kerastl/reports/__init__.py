"""Reports without TensorFlow: evaluation, plots, report.html, the model card and the run facts they
read from a run folder.
"""
